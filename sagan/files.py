"""Writing files so that a reader never sees half of one: a temporary name beside the target, then a rename."""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

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
