"""The preprocessing stage's WebDataset shards: found, checked, counted.

`find_shards` resolves a shard location (a directory, a brace pattern or a manifest.json, on a disk or on
object storage through sagan.storage) to its tar files, per-shard sample counts and class count. `size_mismatch` and `sha256_mismatch` check the tars against
the manifest before training. `batches_per_epoch` is what every rank gets, the same for all, which DDP needs
(a rank that runs out first leaves the others hanging in an all-reduce). Reading batches: sagan/loader.py.
"""

import hashlib
import io
import json
import os
from dataclasses import dataclass, replace

import braceexpand
import numpy as np
import torch
from PIL import Image

from .errors import UserError
from .storage import filesystem, is_url


class DataError(UserError, ValueError):
    """Shards that cannot be used (none found, a size or hash off the manifest, a sample that does not read);
    the message names the location or the shard file and says what to do."""


@dataclass
class ShardSet:
    urls: list[str]  # tar paths, or object-storage URLs (s3://bucket/prefix/train/x.tar)
    counts: list[int]  # samples per tar
    num_classes: int
    image_size: int
    manifest: str  # its path or URL
    key: str  # sha256 of the preprocessing options and these shards' sha256s: names the content, not the path
    sizes: list[int]  # bytes per tar, as the manifest recorded them
    sha256s: list[str]  # sha256 per tar, as the manifest recorded them
    cache_dir: str | None = None  # where the loader keeps local copies of shards on object storage (data.cache_dir)
    cache_bytes: int = 0  # the most those copies may take

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def root(self) -> str:
        """The folder or prefix holding manifest.json (preprocessing's --out)."""
        return self.manifest.rpartition("/")[0]

    @property
    def remote(self) -> bool:
        return is_url(self.manifest)


def with_cache(shards: ShardSet, data) -> ShardSet:
    """`shards` read through the loader cache of the config section `data` (data.cache_dir, data.cache_gb)."""
    return replace(shards, cache_dir=data.cache_dir, cache_bytes=int(data.cache_gb * 1e9))


class _Files:
    """find_shards' view of a local folder or an object store (sagan.storage): `name` is a path or a URL."""

    def __init__(self, location: str):
        self.fs, path = filesystem(location)
        self.prefix = location[: len(location) - len(location.split("://", 1)[1])] if is_url(location) else ""

    def path(self, name: str) -> str:
        return name.removeprefix(self.prefix) if self.prefix else os.path.abspath(os.path.expanduser(name))

    def kind(self, name: str) -> str:
        """ "file", "dir" or "none"."""
        import pyarrow.fs as pafs

        kind = self.fs.get_file_info(self.path(name)).type
        return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(kind, "none")

    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read().decode()

    def sizes(self, folder: str) -> dict[str, int]:
        """{name: bytes} of the files in `folder`: one listing request on object storage."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path(folder), allow_not_found=True))
        return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}


def _parent(name: str) -> str:
    return name.rstrip("/").rpartition("/")[0]


def _base(name: str) -> str:
    return name.rstrip("/").rpartition("/")[2]


def _manifest_split(manifest: dict, present: set[str]) -> str | None:
    for split, entry in manifest.get("splits", {}).items():
        if any(r["name"] in present for r in entry["shards"]):
            return split
    return None


def find_shards(location: str, split: str = "train") -> ShardSet:
    """The shards at `location`, a path or an object-storage URL (s3://bucket/prefix): a split directory
    (OUT/train), the output root (OUT), a brace pattern (OUT/train/imagenet128-train-{000000..000009}.tar) or
    OUT/manifest.json. Raises DataError."""
    loc = str(location).rstrip("/")
    if not loc:
        raise DataError("no shard location given: set data.train_shards to a shard directory, pattern or manifest")
    files = _Files(loc)
    if not files.prefix:
        loc = files.path(loc)
    kind = files.kind(loc)  # a real folder whose name holds a brace is a folder, not a pattern
    if _base(loc) == "manifest.json":
        root, tar_dir, wanted = _parent(loc), f"{_parent(loc)}/{split}", None
    elif kind == "dir" and files.kind(f"{loc}/manifest.json") == "file":
        root, tar_dir, wanted = loc, f"{loc}/{split}", None
    elif kind == "dir":
        root, tar_dir, wanted = _parent(loc), loc, None
    elif kind == "none" and "{" not in loc:
        raise DataError(f"{location} does not exist")
    else:
        expanded = list(braceexpand.braceexpand(loc))
        tar_dir = _parent(expanded[0])
        present = files.sizes(tar_dir)
        wanted = {_base(p) for p in expanded if _base(p) in present}
        if not wanted:
            raise DataError(f"shard pattern {location} matches no file")
        root = _parent(tar_dir)
    manifest_path = f"{root}/manifest.json"
    if files.kind(manifest_path) != "file":
        raise DataError(
            f"no manifest.json next to the shards at {location} (looked for {manifest_path}); "
            "shard the data with preprocessing/shard_imagenet.py"
        )
    manifest = json.loads(files.read_text(manifest_path))
    if not manifest.get("complete"):
        raise DataError(
            f"{manifest_path} is not complete (sharding was interrupted or had too many failures); "
            "re-run preprocessing/shard_imagenet.py"
        )
    present = files.sizes(tar_dir)
    name = (
        split
        if split in manifest.get("splits", {}) and _base(tar_dir) == split
        else _manifest_split(manifest, set(present))
    )
    if name is None:
        raise DataError(f"no shards of {manifest_path} found in {tar_dir}")
    records = [r for r in manifest["splits"][name]["shards"] if wanted is None or r["name"] in wanted]
    records = [r for r in records if "sha256" in r and r["num_samples"] > 0]
    missing = [r["name"] for r in records if r["name"] not in present]
    if missing or not records:
        raise DataError(
            f"{tar_dir} is missing {len(missing)} shard(s) of its manifest (first: {missing[:1]}) "
            if missing
            else f"{tar_dir} holds no complete shard"
        )
    # The options hold the resize filter and crop: statistics of differently preprocessed data never share a key.
    content = {"options": manifest["options"], "shards": [[r["name"], r["sha256"]] for r in records]}
    return ShardSet(
        urls=[f"{tar_dir}/{r['name']}" for r in records],
        counts=[r["num_samples"] for r in records],
        num_classes=int(manifest["num_classes"]),
        image_size=int(manifest["options"]["size"]),
        manifest=manifest_path,
        key=hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest(),
        sizes=[int(r["bytes"]) for r in records],
        sha256s=[r["sha256"] for r in records],
    )


def _fix(url: str) -> str:
    root = _parent(_parent(url))  # OUT/<split>/<name>.tar
    return (
        f"delete it and re-run preprocessing/shard_imagenet.py with the same --src and --out (missing shards are "
        f"rebuilt); check every shard with preprocessing/shard_imagenet.py --out {root} --verify"
    )


def size_mismatch(shards: ShardSet) -> str | None:
    """The first shard whose file is missing or not the manifest's size, as a one-line message; None if all match.
    Costs one stat per shard on a disk, one listing per folder on object storage."""
    listings: dict[str, dict[str, int]] = {}
    for url, expected in zip(shards.urls, shards.sizes):
        if is_url(url):
            folder = _parent(url)
            if folder not in listings:
                listings[folder] = _Files(folder).sizes(folder)
            size = listings[folder].get(_base(url))
        else:
            try:
                size = os.stat(url).st_size
            except FileNotFoundError:
                size = None
        found = "no file" if size is None else f"{size} bytes"
        if found != f"{expected} bytes":
            return f"shard {url} is damaged: the manifest says {expected} bytes, found {found}; {_fix(url)}"
    return None


def sha256_mismatch(urls: list[str], sha256s: list[str], chunk_bytes: int = 4 << 20) -> str | None:
    """The first of `urls` whose sha256 is not its entry in `sha256s`, as a one-line message; None if all match."""
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    for url, expected in zip(urls, sha256s):
        h = hashlib.sha256()
        if is_url(url):
            fs, path = filesystem(url)
            with fs.open_input_stream(path) as f:
                while block := f.read(chunk_bytes):
                    h.update(block)
        else:
            with open(url, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    h.update(view[:n])
        if h.hexdigest() != expected:
            return sha256_message(url, h.hexdigest(), expected)
    return None


def sha256_message(url: str, found: str, expected: str) -> str:
    return f"shard {url} is damaged: its sha256 is {found[:12]}..., the manifest says {expected[:12]}...; {_fix(url)}"


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
