"""A folder on a disk or under an object-storage prefix (s3://bucket/prefix, gs://...), through sagan.storage's
one pyarrow.fs layer: what the shards, the run folders and their readers need of one.

Every file written appears under its final name only when complete: it is written under a temporary name in
the same folder and then moved (a rename on a disk; a server-side copy on object storage, where an upload
interrupted half-way would otherwise leave a partial object under its final key).
"""

import fnmatch
import os
import tempfile
import uuid
from contextlib import contextmanager

from .storage import filesystem, is_url

TEMP_PATTERN = ".*.tmp-*"  # what an interrupted write leaves: removed by the next run


class Folder:
    """A folder on a disk or under an object-storage prefix: `url(...)` names a file in messages, the other
    methods read and write it."""

    def __init__(self, out: str):
        self.remote = is_url(out)
        self.fs, self.root = filesystem(out)
        self.name = str(out).rstrip("/") if self.remote else self.root

    def url(self, *parts: str) -> str:
        """The user-facing name of `parts` in the folder: a path, or an s3:// URL."""
        return "/".join([self.name, *parts])

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def size(self, *parts: str) -> int | None:
        """Bytes of the file, None when there is none."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self._path(*parts))
        return info.size if info.type == pafs.FileType.File else None

    def read_text(self, *parts: str) -> str | None:
        """The file's text, None when there is none (one request on object storage)."""
        try:
            with self.fs.open_input_stream(self._path(*parts)) as f:
                return f.read().decode()
        except FileNotFoundError:
            return None

    def files(self, folder: str, pattern: str) -> dict[str, int]:
        """{name: bytes} of the files directly in `folder` matching the glob `pattern` (one listing request)."""
        import pyarrow.fs as pafs

        found = self.fs.get_file_info(pafs.FileSelector(self._path(folder), allow_not_found=True))
        return {
            i.base_name: i.size for i in found if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, pattern)
        }

    def dirs(self, pattern: str, folder: str = "") -> list[str]:
        """Names of the folders directly in `folder` (on object storage: the common prefixes) matching `pattern`."""
        import pyarrow.fs as pafs

        where = self._path(folder) if folder else self.root
        found = self.fs.get_file_info(pafs.FileSelector(where, allow_not_found=True))
        return sorted(
            i.base_name for i in found if i.type == pafs.FileType.Directory and fnmatch.fnmatch(i.base_name, pattern)
        )

    @contextmanager
    def local_copy(self, *parts: str):
        """A local path holding the file's bytes for the `with` block (a downloaded temporary copy on object
        storage), or None when there is no such file."""
        if not self.remote:
            yield self._path(*parts) if self.size(*parts) is not None else None
            return
        fd, local = tempfile.mkstemp(prefix="sagan-copy-")
        try:
            with os.fdopen(fd, "wb") as dst, self.fs.open_input_stream(self._path(*parts)) as src:
                while block := src.read(8 << 20):
                    dst.write(block)
        except FileNotFoundError:
            os.unlink(local)
            yield None
            return
        except BaseException:  # a store error or an interruption half-way: no partial copy left behind
            os.unlink(local)
            raise
        try:
            yield local
        finally:
            os.unlink(local)

    def download(self, name: str, target: str) -> bool:
        """The file `name` copied to the local path `target`, in place only when complete; False when absent."""
        from .files import atomic_output

        try:
            src = self.fs.open_input_stream(self._path(name))
        except FileNotFoundError:
            return False
        with src, atomic_output(target) as tmp, open(tmp, "wb") as dst:
            while block := src.read(8 << 20):
                dst.write(block)
        return True

    def remove(self, *parts: str) -> None:
        try:
            self.fs.delete_file(self._path(*parts))
        except FileNotFoundError:
            pass

    def make_folder(self, folder: str = "") -> None:
        if not self.remote:  # object storage has no folders
            os.makedirs(self._path(folder) if folder else self.root, exist_ok=True)

    def write_text(self, name: str, text: str) -> None:
        """`text` as the file `name` (relative to --out), in place only when complete."""
        self._put(name, lambda f: f.write(text.encode()))

    def upload(self, name: str, local: str) -> None:
        """The local file `local` as `name` under --out, in place only when complete."""

        def copy(f):
            with open(local, "rb") as src:
                while block := src.read(8 << 20):
                    f.write(block)

        self._put(name, copy)

    def _put(self, name: str, write) -> None:
        folder, _, base = name.rpartition("/")
        tmp = "/".join(p for p in (folder, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}") if p)
        try:
            with self.fs.open_output_stream(self._path(tmp)) as f:
                write(f)
            self.fs.move(self._path(tmp), self._path(name))
        except BaseException:
            try:
                self.remove(tmp)
            except OSError:  # the store is what failed: the next run removes the temporary file
                pass
            raise
