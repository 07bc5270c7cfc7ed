"""One live process per folder: a lock file naming its holder (host, pid, start), kept fresh by a heartbeat.

Created atomically (a complete temporary file hard-linked into place, which fails when the lock exists; O_EXCL
where hard links are not supported), so it works on local disks and shared file systems (NFS). A lock whose
holder is gone (its pid ended on this host, or its heartbeat stopped) is taken over with a warning. Used for
training runs (pipelines.training.run_lock) and shard folders (preprocessing/shard_imagenet.py).
"""

import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

from sagan.errors import UserError

HEARTBEAT_S = 30.0


STALE_AFTER = 3  # heartbeats missed before a lock from another host counts as abandoned


class FolderLockError(UserError):
    """The folder is held by another live process, or cannot be written; printed as one line."""


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _since(t: float) -> str:
    return datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _read(path: Path) -> dict | None:
    """The lock's record, {} when unreadable (a foreign or damaged file), None when there is no lock."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def stale_reason(record: dict, now: float | None = None) -> str | None:
    """Why the lock `record` is abandoned (its holder is gone), or None while it may be alive."""
    if not record:
        return "the lock file is unreadable"
    now = time.time() if now is None else now
    if record.get("host") == socket.gethostname() and not _pid_alive(int(record.get("pid", -1))):
        return f"pid {record.get('pid')} is no longer running on {record.get('host')}"
    age, interval = now - float(record.get("heartbeat", 0)), float(record.get("heartbeat_s", HEARTBEAT_S))
    if age > STALE_AFTER * interval:  # another host, or this host's pid reused by an unrelated process
        return f"its heartbeat is {age:.0f}s old (refreshed every {interval:g}s)"
    return None


def describe(record: dict) -> str:
    job = f"Ray job {record.get('ray_job_id') or 'none (not submitted as a job)'}, " if "ray_job_id" in record else ""
    return f"host {record.get('host')}, pid {record.get('pid')}, {job}since {_since(float(record.get('start', 0)))}"


class FolderLock:
    """The lock on `folder`: `acquire()` takes it (or raises FolderLockError), `release()` gives it back.
    `label` names what the folder holds in messages ("run r1", "shard folder /data/x"); subclasses word the
    refusal (`busy`) and add to the record (`extra`)."""

    def __init__(
        self, folder: str | Path, label: str, heartbeat_s: float = HEARTBEAT_S, warn=_warn, lock_file: str = ".lock"
    ):
        self.run_dir, self.label = Path(folder), label
        self.path = self.run_dir / lock_file
        self.heartbeat_s, self.warn = heartbeat_s, warn
        self.token = uuid.uuid4().hex  # tells our lock from a later holder's with the same host and pid
        self.created_dir = False
        self._stop = threading.Event()
        self._thread = None

    def extra(self) -> dict:
        """More fields of the lock's record."""
        return {}

    def busy(self, holder: dict) -> str:
        """The one line refusing a second holder while `holder` is alive."""
        return (
            f"{self.label} is in use ({describe(holder)}; lock {self.path}); wait for it to finish, or end pid "
            f"{holder.get('pid')} on {holder.get('host')}"
        )

    def unwritable(self, error: OSError) -> str:
        return f"{self.run_dir} is not writable ({error.strerror or error})"

    def _record(self, start: float) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **self.extra(),
            "start": start,
            "heartbeat": time.time(),
            "heartbeat_s": self.heartbeat_s,
            "token": self.token,
        }

    def _write_temp(self, record: dict) -> Path:
        tmp = self.path.with_name(f"{self.path.name}.{self.token}.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _create(self) -> bool:
        """Put our record in place unless a lock exists; True when it is ours."""
        tmp = self._write_temp(self._record(self.start))
        try:
            os.link(tmp, self.path)  # atomic, and fails when the lock exists (also over NFS)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return self._create_exclusive()  # no hard links (s3fs, gcsfuse, some SMB mounts)
        finally:
            tmp.unlink(missing_ok=True)

    def _create_exclusive(self) -> bool:
        """O_CREAT | O_EXCL where hard links are not supported: atomic on local file systems and NFSv3+."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(self.start), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, stale: dict) -> bool:
        """Remove the abandoned lock `stale`; False when another launch replaced it in the meantime."""
        aside = self.path.with_name(f"{self.path.name}.{self.token}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # someone removed it: race for a fresh one
        moved = _read(aside)
        if moved != stale:  # a launch took it over between our read and our rename: give it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    # The storage primitives; an object-storage lock (sagan.object_lock) replaces them.
    def _prepare(self) -> None:
        self.created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _holder(self) -> dict | None:
        return _read(self.path)

    def _refresh(self) -> None:
        os.replace(self._write_temp(self._record(self.start)), self.path)

    def _remove(self) -> None:
        """Remove the lock if it is still ours (never a later holder's), and a folder this lock made."""
        if self._mine():
            self.path.unlink(missing_ok=True)
        if self.created_dir:
            self.run_dir.rmdir()  # a launch refused before it wrote anything leaves no empty folder

    def acquire(self) -> "FolderLock":
        self.start = time.time()
        try:
            self._prepare()
            for _ in range(5):  # a few rounds settle a race between launches taking over the same stale lock
                if self._create():
                    break
                holder = self._holder()
                if holder is None:
                    continue
                reason = stale_reason(holder)
                if reason is None:
                    raise FolderLockError(self.busy(holder))
                if self._take_over(holder):
                    self.warn(
                        f"taking over the lock of {self.label} left by {describe(holder) if holder else 'an unknown launch'}: "
                        f"{reason}"
                    )
            else:
                raise FolderLockError(
                    f"{self.label}: could not take the lock {self.path} (other processes keep replacing it); retry"
                )
        except OSError as e:
            raise FolderLockError(self.unwritable(e)) from None
        self._thread = threading.Thread(target=self._beat, name=f"lock-{self.path}", daemon=True)
        self._thread.start()
        return self

    def _mine(self) -> bool:
        return (self._holder() or {}).get("token") == self.token

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._mine():
                    self.warn(
                        f"the lock of {self.label} was taken over by another process; this one no longer holds it"
                    )
                    return
                self._refresh()
            except OSError as e:  # a storage hiccup: the next beat tries again
                self.warn(f"could not refresh the lock {self.path}: {e}")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (never a later holder's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._remove()
        except OSError:
            pass

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
