"""Preprocessing throughput and fidelity on generated ImageNet-like JPEGs, printed as one JSON line.

    python benchmarks/preprocess.py [--images 600] [--large-fraction 0.1]

End to end per image: read, decode, centre crop, antialiased resize, JPEG encode, tar (`write_shard`,
the code shard_imagenet.py runs). Reports images/s for one worker process, for two in parallel, the
speed-up from JPEG draft decoding (measured side by side), and the mean absolute difference between the
shards' images and an exact full-resolution decode + resize of the same sources.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import PIL
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import preprocessing.shards as shards
from preprocessing.shards import RESIZE_FILTERS, ImageOptions, load_square, write_shard
from preprocessing.sources import Sample


def make_photo(rng, w: int, h: int) -> Image.Image:
    """A photo-like image: smooth colour fields, edges and sensor-like noise (so JPEG has real detail)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / max(w, h)
    c = rng.uniform(-1, 1, (3, 4)).astype(np.float32)
    img = np.stack(
        [c[k, 0] * x + c[k, 1] * y + 0.5 * np.sin(c[k, 2] * 20 * x + c[k, 3] * 15 * y) for k in range(3)], -1
    )
    img += (x[..., None] > 0.5) * 0.3 + rng.normal(0, 0.04, img.shape).astype(np.float32)
    img = (img - img.min()) / (np.ptp(img) + 1e-6) * 255
    return Image.fromarray(img.astype(np.uint8))


def make_sources(folder: Path, n: int, large_fraction: float, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        large = rng.random() < large_fraction
        w, h = (int(rng.integers(2000, 2600)), int(rng.integers(1500, 2000))) if large else (500, 375)
        if rng.random() < 0.3:
            w, h = h, w  # some portrait
        path = folder / f"img_{i:05d}.JPEG"
        make_photo(rng, w, h).save(path, quality=90)
        samples.append(Sample(f"img_{i:05d}", str(path), i % 10, f"n{i % 10:08d}"))
    return samples


def timed_shards(samples, out: Path, opts, workers: int, tag: str) -> float:
    """Images/s writing `samples` as `workers` shards with `workers` processes."""
    parts = [samples[i::workers] for i in range(workers)]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(write_shard, [str(out / f"{tag}-{i}.tar") for i in range(workers)], parts, [opts] * workers))
    return len(samples) / (time.perf_counter() - start)


def no_draft_shard(path, samples, opts):
    """write_shard with JPEG draft decoding turned off (full-resolution decode)."""
    original = shards.load_square
    shards.load_square = lambda p, o: original(p, o, draft=False)
    try:
        return write_shard(path, samples, opts)
    finally:
        shards.load_square = original


def mean_abs_diff(samples, tar: Path, opts) -> dict:
    """MAD (in /255 units) of the shard's images vs an exact full-resolution decode + resize."""
    out = {
        s["__key__"]: np.asarray(s["jpg"], dtype=np.float32)
        for s in wds.WebDataset(str(tar), shardshuffle=False).decode("pil")
    }
    diffs = []
    for s in samples:
        exact, _ = load_square(s.path, opts, draft=False)
        diffs.append(np.abs(out[s.key] - np.asarray(exact, dtype=np.float32)).mean())
    return {"mean": round(float(np.mean(diffs)), 3), "max_per_image": round(float(np.max(diffs)), 3)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=600, help="generated source images (default 600)")
    p.add_argument("--large-fraction", type=float, default=0.1, help="share of 2000+ px images (default 0.1)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--resize-filter", default="bicubic", choices=sorted(RESIZE_FILTERS))
    p.add_argument("--quality", type=int, default=95)
    args = p.parse_args(argv)
    opts = ImageOptions(args.size, args.resize_filter, args.quality)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        print(f"generating {args.images} source JPEGs...", file=sys.stderr, flush=True)
        samples = make_sources(tmp / "src", args.images, args.large_fraction)
        mean_pixels = np.mean([np.prod(Image.open(s.path).size) for s in samples])
        timed_shards(samples[:50], tmp, opts, 1, "warm")  # page cache and imports
        one = timed_shards(samples, tmp, opts, 1, "one")
        two = timed_shards(samples, tmp, opts, 2, "two")
        start = time.perf_counter()
        no_draft_shard(str(tmp / "nodraft.tar"), samples, opts)
        one_no_draft = len(samples) / (time.perf_counter() - start)
        fidelity = mean_abs_diff(samples, tmp / "one-0.tar", opts)
        jpeg_bytes = np.mean([len(s["jpg"]) for s in wds.WebDataset(str(tmp / "one-0.tar"), shardshuffle=False)])
    result = {
        "benchmark": "preprocess",
        "images": args.images,
        "mean_source_megapixels": round(float(mean_pixels) / 1e6, 3),
        "options": {"size": args.size, "resize_filter": args.resize_filter, "quality": args.quality},
        "cpu_count": os.cpu_count(),
        "pillow": PIL.__version__,
        "images_per_s_1_worker": round(one, 1),
        "images_per_s_2_workers": round(two, 1),
        "scaling_2_vs_1": round(two / one, 2),
        "images_per_s_1_worker_no_draft": round(one_no_draft, 1),
        "draft_speedup": round(one / one_no_draft, 2),
        "mad_vs_exact_resize_255": fidelity,
        "mean_output_jpeg_bytes": int(jpeg_bytes),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
