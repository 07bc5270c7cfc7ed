"""Write the built-in sample set in ImageNet's folder layout, so the demo and tests shard it like ImageNet.

    python preprocessing/make_sample_data.py --out data/sample/raw
    python preprocessing/shard_imagenet.py --src data/sample/raw --out data/sample/shards --size 32

The images are scikit-learn's handwritten digits (1,797 real 8x8 scans in 10 classes, shipped inside the
package, so nothing is downloaded), upscaled to 64x64 JPEGs and split into train and val per class:
OUT/train/digit<k>/*.JPEG, OUT/val/digit<k>/*.JPEG and OUT/LOC_synset_mapping.txt with the class names.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from sagan.errors import UsageError, command

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_sample_data(out: str | Path, size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """Write the digits under `out` (replacing an earlier copy atomically); return {split: image count}."""
    digits = load_digits()
    out = Path(out).resolve()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = tmp / split / f"digit{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in sorted(part):
                pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
                img = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
                img.save(folder / f"digit{label}_{i:04d}.JPEG", quality=95)
                counts[split] += 1
    (tmp / "LOC_synset_mapping.txt").write_text("".join(f"digit{k} {NAMES[k]}\n" for k in range(10)))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return counts


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    p.add_argument("--size", type=int, default=64, help="side of the written images (default 64)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each class held out as val (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        raise UsageError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.size < 8:
        raise UsageError(f"--size must be at least 8, got {args.size}")
    counts = write_sample_data(args.out, args.size, args.val_fraction, args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val digits (10 classes) to {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
