"""Shards on object storage, read whole: one ranged GET per shard instead of a request per sample, checked
against the manifest's sha256 before a byte of it is used, kept in memory (a few per loader process) or in a
bounded local cache folder (data.cache_dir) that every loader process and rank on a node shares.

The cache is keyed by content (the shard's sha256), so a changed or repaired shard set never meets a stale file;
a file appears under its key only when complete and verified (temporary name + rename), one process downloads a
shard while the others wait for it (a lock file), and the least recently used files are removed when the cache
is over its size.
"""

import fcntl
import hashlib
import io
import os
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from .data import DataError, ShardSet, _fix, sha256_message
from .storage import filesystem


def fetch(url: str, size: int, sha256: str, fs=None) -> bytes:
    """The whole object `url` in one read, checked against the manifest's `size` and `sha256`: DataError
    naming it when missing, cut or changed; an OSError of the store propagates (Ray Train retries it).
    `fs`: the store's pyarrow filesystem, when the caller keeps one (else made here)."""
    fs, path = (fs, url.split("://", 1)[1]) if fs is not None else filesystem(url)
    try:  # a HEAD request (pyarrow's, for the size), then one GET of the whole object
        with fs.open_input_file(path) as f:
            data = f.read(size + 1)
    except FileNotFoundError:  # pyarrow's answer to a missing key; another error of the store propagates
        raise DataError(f"shard {url} is missing: no such object; {_fix(url)}") from None
    if len(data) != size:
        raise DataError(f"shard {url} is damaged: the manifest says {size} bytes, found {len(data)}; {_fix(url)}")
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise DataError(sha256_message(url, found, sha256))
    return data


class RemoteShards:
    """Open shards of a ShardSet on object storage, as seekable files: `open(shard)`. Without `cache_dir` the
    bytes of at most `keep` shards are held in this process; with it, files in `cache_dir` (at most `cache_bytes`
    in all, least recently used removed first). `prefetch(shards)` downloads in the background, so reading the
    next group of shards overlaps decoding the current one."""

    def __init__(self, shards: ShardSet, cache_dir: str | None = None, cache_bytes: int = 0, keep: int = 8):
        self.shards, self.cache_dir, self.cache_bytes, self.keep = shards, cache_dir, cache_bytes, keep
        self.held: OrderedDict[int, bytes] = OrderedDict()  # memory mode: most recently used last
        self.pending: dict[int, Future] = {}
        self.pool: ThreadPoolExecutor | None = None
        self.fs = None  # the store's filesystem, made once per process (in a loader process: after the fork)
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)

    def _get(self, shard: int):
        """bytes (memory mode) or an open file of the cached copy of `shard` (open before anyone can remove it)."""
        s = self.shards
        if self.fs is None:
            self.fs = filesystem(s.urls[shard])[0]
        if not self.cache_dir:
            return fetch(s.urls[shard], s.sizes[shard], s.sha256s[shard], self.fs)
        path = os.path.join(self.cache_dir, f"{s.sha256s[shard]}.tar")
        if (cached := self._open_fresh(path, s.sizes[shard])) is not None:
            return cached
        with open(f"{path}.lock", "w") as lock:  # one process downloads; the others wait for its file
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (cached := self._open_fresh(path, s.sizes[shard])) is not None:
                return cached
            data = fetch(s.urls[shard], s.sizes[shard], s.sha256s[shard], self.fs)
            tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                cached = open(tmp, "rb")  # opened before the rename: outlives any trim by another process
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            self._trim(keep=path)
            return cached

    @staticmethod
    def _open_fresh(path: str, size: int):
        """The cached file at `path`, open, when it is complete; None otherwise."""
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return None
        if os.fstat(f.fileno()).st_size != size:
            f.close()
            return None
        try:
            os.utime(path)  # used now: the last to be removed
        except FileNotFoundError:  # removed by another process's trim since: the open file still reads
            pass
        return f

    def _trim(self, keep: str) -> None:
        """Remove the least recently used cached shards until the cache is within its size (never `keep`)."""
        entries = []
        for name in os.listdir(self.cache_dir):
            if ".tar.tmp-" in name:  # a download a killed process left: counted, and removed after an hour
                try:
                    st = os.stat(os.path.join(self.cache_dir, name))
                    if time.time() - st.st_mtime > 3600:
                        os.unlink(os.path.join(self.cache_dir, name))
                except FileNotFoundError:
                    pass
            elif name.endswith(".tar"):
                try:
                    st = os.stat(os.path.join(self.cache_dir, name))
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime, st.st_size, os.path.join(self.cache_dir, name)))
        total = sum(e[1] for e in entries)
        for _, size, path in sorted(entries):
            if total <= self.cache_bytes:
                break
            if path != keep:
                try:
                    os.unlink(path)  # a process reading it keeps its open file
                except FileNotFoundError:
                    pass
                total -= size

    def _result(self, shard: int):
        future = self.pending.pop(shard, None)
        return future.result() if future is not None else self._get(shard)

    def open(self, shard: int):
        """A seekable binary file of `shard`'s bytes."""
        if self.cache_dir:
            return self._result(shard)
        if shard not in self.held:
            self.held[shard] = self._result(shard)
            while len(self.held) > self.keep:
                self.held.popitem(last=False)
        self.held.move_to_end(shard)
        return io.BytesIO(self.held[shard])

    def prefetch(self, shards) -> None:
        """Start downloading `shards` (those not held or on their way) in a background thread."""
        for shard in shards:
            if shard in self.held or shard in self.pending:
                continue
            if self.pool is None:
                self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-fetch")
            self.pending[shard] = self.pool.submit(self._get, shard)
