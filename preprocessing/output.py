"""Where shards are written: a local folder or an object-store prefix (sagan.folder.Folder)."""

import os
import tempfile

from sagan.folder import TEMP_PATTERN, Folder
from sagan.storage import check_storage

__all__ = ["TEMP_PATTERN", "Output", "write_remote"]


class Output(Folder):
    """The --out folder."""

    def check_writable(self) -> None:
        """OSError (a disk) or StorageError (object storage, one line) when nothing can be written under --out."""
        if self.remote:
            check_storage(self.name, "--out")
            return
        self.make_folder()
        probe = self._path(f".write-test-{os.getpid()}")
        open(probe, "wb").close()
        os.unlink(probe)


def write_remote(url: str, write_local) -> dict:
    """Run `write_local(path)` on a local temporary file, then upload it as the object `url`; its return value.
    For shards on object storage: they are built on local disk (hashed there) and uploaded whole."""
    folder, _, base = url.rpartition("/")
    fd, local = tempfile.mkstemp(suffix=".tar", prefix="shard-")
    os.close(fd)
    try:
        record = write_local(local)
        Output(folder).upload(base, local)
        return record
    finally:
        if os.path.exists(local):
            os.unlink(local)
