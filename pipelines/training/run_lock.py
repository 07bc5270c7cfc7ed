"""One live launch per run folder: the folder lock (sagan.folder_lock) on `<run folder>/.lock`.

Two launches with the same run.name would interleave their checkpoints in one folder, and a later resume would
continue from whichever wrote last. On S3 (and S3-compatible stores) the lock is an object written with
conditional requests (ObjectRunLock); other object stores (gs://) are not locked, with a warning.
"""

from contextlib import contextmanager

from pipelines.common.provenance import ray_job_id
from pipelines.common.run_folder import LOCK_FILE, RunFolder
from sagan.folder_lock import HEARTBEAT_S, FolderLock, FolderLockError, _warn, describe
from sagan.object_lock import ObjectLockMixin

RunLockError = FolderLockError  # the one error a refused lock raises, under the name the pipelines know


class RunLock(FolderLock):
    """The lock on a run folder: it names the Ray job holding it, and refuses in the run's words."""

    def __init__(self, run_dir, name: str, heartbeat_s: float = HEARTBEAT_S, warn=_warn):
        super().__init__(run_dir, f"run {name}", heartbeat_s, warn, LOCK_FILE)
        self.name = name

    def extra(self) -> dict:
        return {"ray_job_id": ray_job_id()}

    def busy(self, holder: dict) -> str:
        return (
            f"run {self.name} is already running ({describe(holder)}; lock {self.path}); wait for it to "
            f"finish, stop it (ray job stop {holder.get('ray_job_id') or 'ID'}, or end pid "
            f"{holder.get('pid')} on {holder.get('host')}), or choose another run name"
        )

    def unwritable(self, error: OSError) -> str:
        return f"run.storage_path {self.run_dir.parent} is not writable ({error.strerror or error}); choose another"


class ObjectRunLock(ObjectLockMixin, RunLock):
    """The run lock as an S3 object (sagan.object_lock): conditional writes, so two launches never both hold it."""

    def __init__(self, url: str, name: str, heartbeat_s: float = HEARTBEAT_S, warn=_warn):
        super().__init__(url, name, heartbeat_s, warn)
        self._use_object(f"{url.rstrip('/')}/{LOCK_FILE}")

    def unwritable(self, error: OSError) -> str:
        return f"run.storage_path: the run lock {self.path} cannot be written ({error}); check the bucket and keys"


@contextmanager
def run_lock(storage_path: str, name: str, heartbeat_s: float = HEARTBEAT_S, warn=_warn):
    """Hold the lock on `<storage_path>/<name>` for the `with` block; RunLockError when another launch holds it.
    Remote storage (scheme://) is not locked: one warning line says so."""
    folder = RunFolder(storage_path, name)
    if folder.uri.startswith("s3://"):
        with ObjectRunLock(folder.uri, name, heartbeat_s, warn) as lock:
            yield lock
        return
    if folder.remote:
        warn(f"{storage_path} is remote storage, which cannot be locked: make sure no other launch of {name} runs")
        yield None
        return
    with RunLock(folder.local, name, heartbeat_s, warn) as lock:
        yield lock
