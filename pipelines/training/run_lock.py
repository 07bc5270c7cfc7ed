"""One live launch per run folder: the folder lock (sagan.folder_lock) on `<run folder>/.lock`.

Two launches with the same run.name would interleave their checkpoints in one folder, and a later resume would
continue from whichever wrote last. On S3 (and S3-compatible stores) the lock is an object written with
conditional requests (ObjectRunLock); other object stores (gs://) are not locked, with a warning.
"""

import json
from contextlib import contextmanager

from pipelines.common.provenance import ray_job_id
from pipelines.common.run_folder import LOCK_FILE, RunFolder
from sagan.folder_lock import HEARTBEAT_S, FolderLock, FolderLockError, _warn, describe

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


class ObjectRunLock(RunLock):
    """The run lock as an S3 object: created only while absent (PUT with If-None-Match: *), refreshed and removed
    only while its ETag is still the one this launch wrote (If-Match), and an abandoned one deleted only while it
    is still the one judged abandoned, so two launches can never both hold it. boto3 finds the store as MLflow
    does (AWS_ENDPOINT_URL, the standard credentials)."""

    def __init__(self, url: str, name: str, heartbeat_s: float = HEARTBEAT_S, warn=_warn):
        super().__init__(url, name, heartbeat_s, warn)
        self.path = f"{url.rstrip('/')}/{LOCK_FILE}"
        self.bucket, self.key = self.path.removeprefix("s3://").split("/", 1)
        self.etag = self.seen = None  # the ETag this launch wrote; the one last read
        import boto3  # here: only a run on S3 needs it
        from botocore.config import Config

        self.client = boto3.client("s3", config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}))

    def _call(self, method: str, **kwargs) -> dict | None:
        """The S3 call, None when its condition failed (another launch got there first); OSError otherwise."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(Bucket=self.bucket, Key=self.key, **kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404"):
                return None
            raise OSError(f"{method}: {code or e}") from None
        except BotoCoreError as e:
            raise OSError(f"{method}: {e}") from None

    def _put(self, **condition) -> bool:
        body = json.dumps(self._record(self.start)).encode()
        answer = self._call("put_object", Body=body, ContentType="application/json", **condition)
        if answer is not None:
            self.etag = answer["ETag"]
        return answer is not None

    def _prepare(self) -> None:
        self.created_dir = False

    def _create(self) -> bool:
        return self._put(IfNoneMatch="*")

    def _holder(self) -> dict | None:
        answer = self._call("get_object")
        if answer is None:
            return None
        self.seen = answer["ETag"]
        try:
            record = json.loads(answer["Body"].read())
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def _take_over(self, stale: dict) -> bool:
        return self.seen is not None and self._call("delete_object", IfMatch=self.seen) is not None

    def _refresh(self) -> None:
        if not self._put(IfMatch=self.etag):
            raise OSError("the lock object changed since this launch wrote it")

    def _remove(self) -> None:
        if self.etag:
            self._call("delete_object", IfMatch=self.etag)

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
