"""Files of the library: written so that a reader never sees half of one (a temporary name beside the target,
then a rename), copied into a cache once, hashed, and cached entries read back."""

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

# The process's umask, read once at import (setting it to read it is not thread-safe): a plain open() gives new
# files 0666 less these bits; mkstemp gives 0600, which other users of a shared volume could not read.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_output(path: str | Path):
    """A temporary path beside `path` (same suffix) to write to: renamed to `path` when the block succeeds,
    removed when it fails. The file gets the permissions a plain open() would give it (mkstemp's are 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name: writers on other nodes of a shared file system may have the same pid.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=path.suffix)
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def copy_into(path: Path, cache: Path) -> Path:
    """`path` copied into `cache` (atomically, once), where every node sharing the cache finds it."""
    target = Path(cache) / path.name
    if target.is_file() and target.stat().st_size == path.stat().st_size:
        return target
    with atomic_output(target) as tmp:
        shutil.copyfile(path, tmp)
    return target


def load_cached(path: Path, log) -> dict | None:
    """The dict torch saved at `path`, or None (a miss) when it is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed, whatever the damage
        log(f"cache entry {path} is unreadable ({type(e).__name__}); recomputing it")
        return None
