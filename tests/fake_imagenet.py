"""Small ImageNet-like source trees with ImageNet's oddities, in the folder and the Kaggle layouts."""

import csv
from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850"]
BAD_FILES = ("truncated.JPEG", "empty.JPEG", "notes.JPEG")  # the three that must fail


def _photo(rng, w, h):
    """A smooth colour image (gradients plus blobs) that compresses like a photo."""
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    c = rng.uniform(0, 1, (3, 3))
    img = np.stack([c[k, 0] * x + c[k, 1] * y + c[k, 2] * np.sin(8 * x + 5 * y + k) for k in range(3)], -1)
    img = (img - img.min()) / (np.ptp(img) + 1e-9) * 255
    return Image.fromarray(img.astype(np.uint8))


def _write_class(folder: Path, wnid: str, rng, n: int, oddities: bool):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _photo(rng, int(rng.integers(80, 300)), int(rng.integers(80, 300))).save(
            folder / f"{wnid}_{i}.JPEG", quality=90
        )
    if not oddities:
        return
    _photo(rng, 200, 150).save(folder / f"{wnid}_png.JPEG", format="PNG")  # a PNG named .JPEG
    _photo(rng, 160, 120).convert("CMYK").save(folder / f"{wnid}_cmyk.JPEG", format="JPEG")
    _photo(rng, 150, 150).convert("L").save(folder / f"{wnid}_gray.JPEG")
    _photo(rng, 140, 140).convert("P").save(folder / f"{wnid}_palette.JPEG", format="PNG")
    deep = (np.linspace(0, 65535, 130 * 130).reshape(130, 130)).astype(np.uint16)
    Image.fromarray(deep).save(folder / f"{wnid}_16bit.JPEG", format="PNG")
    _photo(rng, 1200, 60).save(folder / f"{wnid}_wide.JPEG")
    _photo(rng, 10, 7).save(folder / f"{wnid}_tiny.JPEG")


def _write_bad(folder: Path, rng):
    buf = folder / BAD_FILES[0]
    _photo(rng, 300, 300).save(buf, quality=90)
    data = buf.read_bytes()
    buf.write_bytes(data[: len(data) // 3])
    (folder / BAD_FILES[1]).write_bytes(b"")
    (folder / BAD_FILES[2]).write_text("not an image\n")


def make_tree(root: Path, layout: str = "folders", n_train: int = 6, n_val: int = 3, seed: int = 0) -> dict:
    """Write a 3-class tree under `root`; return {"train": n_good, "val": n_good, "bad": [paths]}."""
    rng = np.random.default_rng(seed)
    base = root / "ILSVRC/Data/CLS-LOC" if layout == "kaggle" else root
    for k, wnid in enumerate(WNIDS):
        _write_class(base / "train" / wnid, wnid, rng, n_train, oddities=(k == 0))
    _write_bad(base / "train" / WNIDS[1], rng)
    rows = []
    for wnid in WNIDS:
        folder = base / "val" if layout == "kaggle" else base / "val" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_val):
            stem = f"ILSVRC2012_val_{wnid[-4:]}{i}"
            _photo(rng, 250, 200).save(folder / f"{stem}.JPEG", quality=90)
            rows.append((stem, f"{wnid} 1 2 3 4"))
    if layout == "kaggle":
        with open(root / "LOC_val_solution.csv", "w", newline="") as f:
            csv.writer(f).writerows([("ImageId", "PredictionString"), *rows])
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {w}\n" for w in WNIDS))
    return {"train": 3 * n_train + 7, "val": 3 * n_val, "bad": [str(base / "train" / WNIDS[1] / b) for b in BAD_FILES]}
