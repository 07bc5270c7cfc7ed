"""The preprocessing stage's WebDataset shards: found, checked, counted.

`find_shards` resolves a shard location (a directory, a brace pattern or a manifest.json) to its tar
files, per-shard sample counts and class count. `size_mismatch` and `sha256_mismatch` check the tars against
the manifest before training. `batches_per_epoch` is what every rank gets, the same for all, which DDP needs
(a rank that runs out first leaves the others hanging in an all-reduce). Reading batches: sagan/loader.py.
"""

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np
import torch
from PIL import Image

from .errors import UserError


class DataError(UserError, ValueError):
    """Shards that cannot be used (none found, a size or hash off the manifest, a sample that does not read);
    the message names the location or the shard file and says what to do."""


@dataclass
class ShardSet:
    urls: list[str]  # tar paths
    counts: list[int]  # samples per tar
    num_classes: int
    image_size: int
    manifest: Path
    key: str  # sha256 of the preprocessing options and these shards' sha256s: names the content, not the path
    sizes: list[int]  # bytes per tar, as the manifest recorded them
    sha256s: list[str]  # sha256 per tar, as the manifest recorded them

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def _manifest_split(manifest: dict, tar_dir: Path) -> str | None:
    for split, entry in manifest.get("splits", {}).items():
        if any((tar_dir / r["name"]).exists() for r in entry["shards"]):
            return split
    return None


def find_shards(location: str, split: str = "train") -> ShardSet:
    """The shards at `location`: a split directory (OUT/train), the output root (OUT), a brace pattern
    (OUT/train/imagenet128-train-{000000..000009}.tar) or OUT/manifest.json. Raises DataError."""
    loc = str(location)
    if not loc:
        raise DataError("no shard location given: set data.train_shards to a shard directory, pattern or manifest")
    path = Path(loc).expanduser()
    if path.name == "manifest.json":
        root, tar_dir, wanted = path.parent, path.parent / split, None
    elif path.is_dir() and (path / "manifest.json").is_file():
        root, tar_dir, wanted = path, path / split, None
    elif path.is_dir():
        root, tar_dir, wanted = path.parent, path, None
    elif "{" not in loc and not path.exists():
        raise DataError(f"{loc} does not exist")
    else:
        expanded = [Path(p) for p in braceexpand.braceexpand(loc)]
        wanted = {p.name for p in expanded if p.is_file()}
        if not wanted:
            raise DataError(f"shard pattern {loc} matches no file")
        tar_dir = expanded[0].parent
        root = tar_dir.parent
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(
            f"no manifest.json next to the shards at {loc} (looked for {manifest_path}); "
            "shard the data with preprocessing/shard_imagenet.py"
        )
    manifest = json.loads(manifest_path.read_text())
    if not manifest.get("complete"):
        raise DataError(
            f"{manifest_path} is not complete (sharding was interrupted or had too many failures); "
            "re-run preprocessing/shard_imagenet.py"
        )
    name = (
        split if split in manifest.get("splits", {}) and tar_dir.name == split else _manifest_split(manifest, tar_dir)
    )
    if name is None:
        raise DataError(f"no shards of {manifest_path} found in {tar_dir}")
    records = [r for r in manifest["splits"][name]["shards"] if wanted is None or r["name"] in wanted]
    records = [r for r in records if "sha256" in r and r["num_samples"] > 0]
    missing = [r["name"] for r in records if not (tar_dir / r["name"]).is_file()]
    if missing or not records:
        raise DataError(
            f"{tar_dir} is missing {len(missing)} shard(s) of its manifest (first: {missing[:1]}) "
            if missing
            else f"{tar_dir} holds no complete shard"
        )
    # The options hold the resize filter and crop: statistics of differently preprocessed data never share a key.
    content = {"options": manifest["options"], "shards": [[r["name"], r["sha256"]] for r in records]}
    return ShardSet(
        urls=[str(tar_dir / r["name"]) for r in records],
        counts=[r["num_samples"] for r in records],
        num_classes=int(manifest["num_classes"]),
        image_size=int(manifest["options"]["size"]),
        manifest=manifest_path,
        key=hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest(),
        sizes=[int(r["bytes"]) for r in records],
        sha256s=[r["sha256"] for r in records],
    )


def _fix(url: str) -> str:
    root = Path(url).parent.parent  # OUT/<split>/<name>.tar
    return (
        f"delete it and re-run preprocessing/shard_imagenet.py with the same --src and --out (missing shards are "
        f"rebuilt); check every shard with preprocessing/shard_imagenet.py --out {root} --verify"
    )


def size_mismatch(shards: ShardSet) -> str | None:
    """The first shard whose file is missing or not the manifest's size, as a one-line message; None if all match.
    Costs one stat per shard."""
    for url, expected in zip(shards.urls, shards.sizes):
        try:
            found = f"{os.stat(url).st_size} bytes"
        except FileNotFoundError:
            found = "no file"
        if found != f"{expected} bytes":
            return f"shard {url} is damaged: the manifest says {expected} bytes, found {found}; {_fix(url)}"
    return None


def sha256_mismatch(urls: list[str], sha256s: list[str], chunk_bytes: int = 4 << 20) -> str | None:
    """The first of `urls` whose sha256 is not its entry in `sha256s`, as a one-line message; None if all match."""
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    for url, expected in zip(urls, sha256s):
        h = hashlib.sha256()
        with open(url, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
        if h.hexdigest() != expected:
            return (
                f"shard {url} is damaged: its sha256 is {h.hexdigest()[:12]}..., the manifest says "
                f"{expected[:12]}...; {_fix(url)}"
            )
    return None


def decode_uint8(jpg: bytes) -> torch.Tensor:
    """JPEG bytes -> (3, H, W) uint8 tensor."""
    arr = np.array(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1)


def batches_per_epoch(shards: ShardSet, world_size: int, batch_size: int) -> int:
    """Batches every rank yields per epoch: what the rank with the fewest samples can fill (equal for all)."""
    if len(shards.urls) < world_size:
        raise DataError(
            f"{len(shards.urls)} shard(s) for {world_size} workers: shard with a smaller --shard-size "
            "so every worker gets at least one"
        )
    # Shards are dealt round-robin after a per-epoch shuffle; bound by the smallest possible share.
    per_rank = len(shards.urls) // world_size
    smallest = sum(sorted(shards.counts)[:per_rank])
    n = smallest // batch_size
    if n == 0:
        raise DataError(f"each worker's share ({smallest} samples) is smaller than one batch of {batch_size}")
    return n
