"""A cache folder on object storage (eval.cache_dir=s3://bucket/prefix), used through a local mirror.

The evaluation cache's files are named by a key of what they hold (fid-stats-...-<key>.pt, sample-classifier-
<key>.pt, the Inception file by its sha256 prefix), so a file of one name holds the same thing in the mirror and
in the bucket: `pull` copies the bucket's files the mirror lacks, `push` the mirror's files the bucket lacks (or
holds at another size). Every node of a cluster without a shared disk so finds what one node computed, and each
file is downloaded once per node.
"""

import fnmatch
import hashlib
from pathlib import Path

from .folder import TEMP_PATTERN, Folder
from .storage import user_cache


def mirror_dir(url: str) -> Path:
    """The local folder mirroring `url`: ~/.cache/sagan/mirrors/<hash of the URL> (sagan.storage.user_cache)."""
    return user_cache() / "mirrors" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def _visible(name: str) -> bool:
    return not name.startswith(".") and not fnmatch.fnmatch(name, TEMP_PATTERN)


def pull(url: str, skip: tuple[str, ...] = ()) -> Path:
    """The mirror of `url`, holding every file of the bucket's folder but those matching a pattern of `skip`
    (one listing request, then one download per file the mirror lacks)."""
    local, remote = mirror_dir(url), Folder(url)
    local.mkdir(parents=True, exist_ok=True)
    for name, size in remote.files("", "*").items():
        if any(fnmatch.fnmatch(name, pattern) for pattern in skip):
            continue
        if _visible(name) and not ((local / name).is_file() and (local / name).stat().st_size == size):
            remote.download(name, str(local / name))
    return local


def push(url: str) -> None:
    """Upload the mirror's files that the bucket's folder lacks or holds at another size."""
    local, remote = mirror_dir(url), Folder(url)
    if not local.is_dir():
        return
    stored = remote.files("", "*")
    for path in sorted(local.iterdir()):
        if path.is_file() and _visible(path.name) and stored.get(path.name) != path.stat().st_size:
            remote.upload(path.name, str(path))
