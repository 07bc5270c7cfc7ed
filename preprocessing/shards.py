"""Turning source images into 128x128 WebDataset shards, and checking shards against their manifest.

One shard is written by one process (`write_shard`), so the same function serves a local process pool and
Ray tasks. A shard appears under its final name only when complete (temp file + rename).
"""

import functools
import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageOps

from sagan.storage import filesystem, is_url

from .output import Output, write_remote
from .sources import Sample

RESIZE_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
# JPEG draft decoding keeps the short side >= DRAFT_MARGIN x the target. At 1.0 a 500x375 photo decodes
# at half scale: 1.4x faster end to end for a mean difference of ~1/255 from an exact decode + resize
# (benchmarks/preprocess.py measures both).
DRAFT_MARGIN = 1.0
Image.MAX_IMAGE_PIXELS = 200_000_000  # ImageNet's largest images are far below; beyond this is not a photo


@dataclass(frozen=True)
class ImageOptions:
    size: int = 128
    resize_filter: str = "bicubic"
    quality: int = 95


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode PIL opens: 16-bit and 32-bit grey are scaled, palettes and CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img) * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def source_file(path: str):
    """What PIL opens for the source image at `path`: the path, or the bytes of an object (one request)."""
    if not is_url(path):
        return path
    scheme, rest = path.split("://", 1)
    bucket, key = rest.split("/", 1)
    with _filesystem(f"{scheme}://{bucket}").open_input_stream(f"{bucket}/{key}") as f:
        return io.BytesIO(f.read())


@functools.lru_cache(maxsize=4)
def _filesystem(bucket_url: str):  # one per process and bucket (each holds a connection pool)
    return filesystem(bucket_url)[0]


def load_square(path: str, opts: ImageOptions, draft: bool = True) -> tuple[Image.Image, dict]:
    """The centre square crop of side min(w, h) of the image at `path`, resized to opts.size, as RGB, and
    {"size": [w, h], "mode": mode} of the source. Raises on unreadable or truncated files.

    With `draft`, JPEGs are decoded at a reduced scale (libjpeg's DCT-domain downscale) that keeps the
    short side at least DRAFT_MARGIN x the target, which cuts decode time several-fold on large images.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns on odd EXIF data; a failed decode still raises
        with Image.open(source_file(path)) as img:
            info = {"size": list(img.size), "mode": img.mode}
            if draft and img.format == "JPEG" and img.mode in ("RGB", "L"):
                w, h = img.size
                scale = min(w, h) / (DRAFT_MARGIN * opts.size)
                if scale >= 2:
                    img.draft(img.mode, (int(w / scale), int(h / scale)))
            img.load()
            # Upright as the camera held it, as torchvision's and most ImageNet pipelines' decoders show it: a
            # photo stored sideways with an EXIF Orientation tag would otherwise be trained on sideways.
            rgb = to_rgb(ImageOps.exif_transpose(img))
    w, h = rgb.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    out = rgb.resize((opts.size, opts.size), RESIZE_FILTERS[opts.resize_filter], box=box)
    return out, info


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """JPEG bytes with 4:4:4 chroma (no subsampling), so small images keep their colour edges."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(path: str, samples: list[Sample], opts: ImageOptions) -> dict:
    """Write `samples` as one WebDataset tar at `path`, a file or an object-storage URL (atomically); return its
    manifest record.

    Each sample becomes <key>.jpg (opts.size square RGB), <key>.cls (ASCII class index) and <key>.json
    (wnid, source size and mode). Files that cannot be decoded are left out and listed under "failures".
    """
    if is_url(path):  # built on local disk, then uploaded whole
        return write_remote(path, lambda local: {**write_shard(local, samples, opts), "name": path.rsplit("/", 1)[1]})
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    failures, class_counts, written = [], {}, 0
    try:
        with open(tmp, "wb") as f:
            # mtime 0 and fixed owner: the same input gives byte-identical tars
            with wds.TarWriter(f, user="", group="", mode=0o644, encoder=False, mtime=0) as tar:
                for s in samples:
                    try:
                        img, info = load_square(s.path, opts)
                    except Exception as e:  # noqa: BLE001 - any decode failure is recorded and skipped
                        failures.append({"path": s.path, "reason": f"{type(e).__name__}: {e}"})
                        continue
                    meta = {"wnid": s.wnid, "source_size": info["size"], "source_mode": info["mode"]}
                    tar.write(
                        {
                            "__key__": s.key,
                            "jpg": encode_jpeg(img, opts.quality),
                            "cls": str(s.label).encode("ascii"),
                            "json": json.dumps(meta, sort_keys=True).encode(),
                        }
                    )
                    class_counts[s.label] = class_counts.get(s.label, 0) + 1
                    written += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "name": path.name,
        "num_samples": written,
        "planned": len(samples),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "class_counts": {str(k): v for k, v in sorted(class_counts.items())},
        "failures": failures,
    }


def verify_split(out: Output, split: str, split_manifest: dict, wnids: list[str], size: int) -> list[str]:
    """Problems found re-reading every shard of a split with the webdataset library (empty when all is well):
    hashes, per-shard counts, image size and mode, and labels against each sample's wnid. Shards on object
    storage are downloaded one at a time to a local temporary file."""
    problems = []
    index = {w: i for i, w in enumerate(wnids)}
    for shard in split_manifest["shards"]:
        name = out.url(split, shard["name"])
        if "sha256" not in shard:
            problems.append(f"{name}: not built (the run that planned it did not finish)")
            continue
        with out.local_copy(split, shard["name"]) as path:
            if path is None:
                problems.append(f"{name}: missing")
                continue
            if sha256_file(path) != shard["sha256"]:
                problems.append(f"{name}: sha256 differs from the manifest")
                continue
            count = 0
            dataset = wds.WebDataset(str(path), shardshuffle=False, empty_check=False).decode("pil")
            for sample in dataset:
                count += 1
                img, label, meta = sample["jpg"], int(sample["cls"]), sample["json"]
                if img.size != (size, size) or img.mode != "RGB":
                    problems.append(
                        f"{name}:{sample['__key__']}: image is {img.mode} {img.size}, expected RGB {size}x{size}"
                    )
                if index.get(meta["wnid"]) != label:
                    problems.append(f"{name}:{sample['__key__']}: label {label} but wnid {meta['wnid']}")
            if count != shard["num_samples"]:
                problems.append(f"{name}: {count} samples, manifest says {shard['num_samples']}")
    return problems
