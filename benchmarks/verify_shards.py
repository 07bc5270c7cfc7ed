"""What data.verify costs before training: sha256 throughput and the size check's time, printed as JSON.

    python benchmarks/verify_shards.py                          # the sample digits, sharded into a temp folder
    python benchmarks/verify_shards.py --shards /data/imagenet128/train --min-gb 4

Hashes with the code `data.verify=full` runs (`sagan.data.sha256_mismatch`) in one process. The first pass
reads the shards after asking the kernel to drop them from the page cache (posix_fadvise DONTNEED: best
effort, no effect on tmpfs); further passes repeat the shards until --min-gb have been read, from a warm
page cache when the shards fit in memory. The sample shards are too small (6 MB) for a cold figure, so a
file of --cold-mb random bytes is written to the temporary folder, dropped from the cache and hashed. Also:
hashlib's sha256 on a buffer in memory (the CPU's bound), the stat-only size check (`data.verify=size`) per 1000 shards, and the tar bytes per sample of 128 px
photo-like images, to estimate ImageNet's train split (1,281,167 images).
"""

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sagan.data import ShardSet, find_shards, sha256_mismatch, size_mismatch

IMAGENET_TRAIN = 1_281_167
RESULTS = Path(__file__).resolve().parent / "results" / "verify_shards.json"


def sample_shards(folder: Path) -> str:
    """The built-in digits sharded at 32 px under `folder`; returns the train split's directory."""
    from preprocessing.make_sample_data import write_sample_data
    from preprocessing.shard_imagenet import main as shard_main

    write_sample_data(folder / "raw")
    shard_main(["--src", str(folder / "raw"), "--out", str(folder / "shards"), "--size", "32", "--shard-size", "200"])
    return str(folder / "shards" / "train")


def evict(urls: list[str]) -> None:
    for url in urls:
        fd = os.open(url, os.O_RDONLY)
        try:
            os.fsync(fd)  # only clean pages can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_hash(shards: ShardSet, passes: int, chunk_bytes: int, repeats: int = 3, cold: bool = False) -> dict:
    """sha256_mismatch over `passes` passes of `shards`, timed `repeats` times (each from a dropped page cache when
    `cold`): the best and the median, as other processes on the machine slow some repeats down."""
    times = []
    for _ in range(repeats):
        if cold:
            evict(shards.urls)
        start = time.perf_counter()
        problem = sha256_mismatch(shards.urls * passes, shards.sha256s * passes, chunk_bytes)
        times.append(time.perf_counter() - start)
        if problem:
            raise SystemExit(f"error: {problem}")
    total = sum(shards.sizes) * passes
    best, median = min(times), sorted(times)[len(times) // 2]
    return {
        "shards_read": len(shards.urls) * passes,
        "bytes": total,
        "repeats": repeats,
        "seconds": [round(t, 3) for t in times],
        "mb_per_s_best": round(total / 1e6 / best, 1),
        "mb_per_s_median": round(total / 1e6 / median, 1),
        "s_per_gb_median": round(median / (total / 1e9), 2),
    }


def cold_file(folder: Path, mb: int, chunk_bytes: int) -> dict:
    """sha256 of a fresh file of `mb` MB random bytes read after dropping it from the page cache."""
    path = folder / "cold.bin"
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    size = path.stat().st_size
    one = ShardSet(
        urls=[str(path)],
        counts=[0],
        num_classes=0,
        image_size=0,
        manifest=path,
        key="",
        sizes=[size],
        sha256s=[hashlib.sha256(path.read_bytes()).hexdigest()],
    )
    return {
        **timed_hash(one, 1, chunk_bytes, cold=True),
        "filesystem": filesystem(str(path)),
        "page_cache": "dropped before the pass with posix_fadvise(DONTNEED), best effort",
    }


def memory_sha256(n_bytes: int = 256 << 20, chunk_bytes: int = 4 << 20, repeats: int = 3) -> float:
    """Best MB/s of hashlib's sha256 over a buffer already in memory."""
    view = memoryview(os.urandom(chunk_bytes))
    times = []
    for _ in range(repeats):
        h = hashlib.sha256()
        start = time.perf_counter()
        for _ in range(n_bytes // chunk_bytes):
            h.update(view)
        times.append(time.perf_counter() - start)
    return round(n_bytes / 1e6 / min(times), 1)


def size_check_per_1000(shards: ShardSet, n: int = 20_000) -> float:
    """Seconds the stat-only size check takes per 1000 shards (the same files stat'ed again to reach n)."""
    reps = -(-n // len(shards.urls))
    many = ShardSet(
        urls=shards.urls * reps,
        counts=shards.counts * reps,
        num_classes=shards.num_classes,
        image_size=shards.image_size,
        manifest=shards.manifest,
        key=shards.key,
        sizes=shards.sizes * reps,
        sha256s=shards.sha256s * reps,
    )
    start = time.perf_counter()
    assert size_mismatch(many) is None
    return round((time.perf_counter() - start) / len(many.urls) * 1000, 5)


def bytes_per_sample_128(folder: Path, images: int) -> int:
    """Tar bytes per sample (jpg, cls and json members with their headers) of 128 px q95 shards made from
    generated photo-like JPEGs: a stand-in for ImageNet, whose real figure is the manifest's."""
    from benchmarks.preprocess import make_sources
    from preprocessing.shards import ImageOptions, write_shard

    (folder / "photos").mkdir()
    record = write_shard(str(folder / "photos.tar"), make_sources(folder / "photos", images, 0.0), ImageOptions(128))
    return round(record["bytes"] / record["num_samples"])


def filesystem(path: str) -> str:
    """The type of the filesystem holding `path`, from /proc/mounts (Linux)."""
    best = ("", "unknown")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            mount, kind = line.split()[1:3]
            if os.path.realpath(path).startswith(mount) and len(mount) > len(best[0]):
                best = (mount, kind)
    except OSError:
        pass
    return best[1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=None, help="a shard directory, pattern or manifest (default: the sample digits)")
    p.add_argument("--min-gb", type=float, default=0.25, help="bytes to hash in all, repeating passes (default 0.25)")
    p.add_argument("--chunk-mb", type=int, default=4, help="read size of the hash loop (default 4, as preflight)")
    p.add_argument("--cold-mb", type=int, default=256, help="random file hashed from a dropped page cache (0: none)")
    p.add_argument("--photos", type=int, default=200, help="generated 128 px images for the bytes-per-sample estimate")
    p.add_argument("--out", default=str(RESULTS), help=f"JSON file (default {RESULTS.relative_to(RESULTS.parents[2])})")
    args = p.parse_args(argv)
    chunk = args.chunk_mb << 20
    load = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        location = args.shards or sample_shards(Path(tmp))
        shards = find_shards(location)
        first = timed_hash(shards, 1, chunk, cold=True)
        total = sum(shards.sizes)
        passes = max(1, -(-int(args.min_gb * 1e9) // total))  # at least --min-gb
        warm = timed_hash(shards, passes, chunk)
        per_sample = bytes_per_sample_128(Path(tmp), args.photos) if args.photos else None
        result = {
            "benchmark": "verify_shards",
            "shards": location if args.shards else "sample digits, 32 px, 200 per shard (temporary)",
            "num_shards": len(shards.urls),
            "shard_bytes": total,
            "filesystem": filesystem(shards.urls[0]),
            "cpu": platform.processor() or platform.machine(),
            "cpu_sha_extensions": "sha_ni" in Path("/proc/cpuinfo").read_text()
            if Path("/proc/cpuinfo").exists()
            else None,
            "python": platform.python_version(),
            "load_average_1min_before": load,  # other processes share the cores: the figures are lower bounds
            "chunk_bytes": chunk,
            "first_pass": {**first, "page_cache": "dropped before the pass with posix_fadvise(DONTNEED), best effort"},
            "repeated_passes": {**warm, "passes": passes, "page_cache": "warm (the shards were just read)"},
            "cold_file": cold_file(Path(tmp), args.cold_mb, chunk) if args.cold_mb else None,
            "sha256_in_memory_mb_per_s_best": memory_sha256(),
            "size_check_s_per_1000_shards": size_check_per_1000(shards),
        }
    if per_sample:
        gb = IMAGENET_TRAIN * per_sample / 1e9
        result["imagenet_train_estimate"] = {
            "bytes_per_sample_128px": per_sample,
            "basis": f"{args.photos} generated photo-like JPEGs through write_shard at 128 px, q95 4:4:4",
            "gb": round(gb, 1),
            "sha256_s_one_core_warm": round(gb * warm["s_per_gb_median"]),
            "sha256_s_one_core_from_disk": round(gb * result["cold_file"]["s_per_gb_median"]) if args.cold_mb else None,
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
