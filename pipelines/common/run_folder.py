"""The run folder's layout, in one place. A run (or a sweep) keeps everything under `run.storage_path/NAME/`:

    checkpoint_<time>/checkpoint.pt     Ray Train's checkpoints, the latest run.keep_checkpoints
    checkpoint_manager_snapshot.json    Ray Train's record of them: its latest is what a relaunch resumes
    best/checkpoint.pt, best/best.json  the checkpoint with the lowest in-loop FID so far
    samples/samples_NNNNNN.png          sample grids, as files a person can open
    STOPPED.json                        why a stopped run stopped: Ray's retries and later launches stop at once
    mlflow-pending/                     MLflow items the store had not taken when the run ended
    .lock                               the live launch that holds the folder

The storage may be a local (or mounted) folder or object storage (`s3://bucket/prefix`): `files` reads and
writes either (sagan.folder); `is_remote` tells them apart where it matters (the lock, the MLflow outbox).
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from sagan.checkpoint import CheckpointError, load_checkpoint
from sagan.errors import UsageError
from sagan.folder import Folder
from sagan.storage import is_url, user_cache

CHECKPOINT_FILE = "checkpoint.pt"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the run's checkpoints
BEST_DIR = "best"
BEST_FILE = "best.json"
SAMPLES_DIR = "samples"
STOPPED_FILE = "STOPPED.json"
PENDING_DIR = "mlflow-pending"
LOCK_FILE = ".lock"

is_remote = is_url  # object storage or another filesystem by URI (s3://, gs://, ...), not a local path


def absolute(path: str | None) -> str | None:
    """Local paths made absolute (Ray workers run in another directory); URIs (s3://...) and "" as they are."""
    return path if not path or is_remote(path) else str(Path(path).expanduser().resolve())


@dataclass(frozen=True)
class RunFolder:
    """The folder of run `name` under `storage_path`, and where each of its parts lives."""

    storage_path: str
    name: str

    @classmethod
    def of(cls, cfg) -> "RunFolder":
        """The folder of a config's run (run.storage_path / run.name)."""
        return cls(cfg.run.storage_path, cfg.run.name)

    @property
    def remote(self) -> bool:
        return is_remote(self.storage_path)

    @property
    def uri(self) -> str:
        """The folder as a string: a local path or a URI, as Ray's storage_path/name takes it."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def local(self) -> Path | None:
        """The folder as a local Path, or None on remote storage."""
        return None if self.remote else Path(self.storage_path) / self.name

    def _local_part(self, *parts: str) -> Path | None:
        return None if self.local is None else self.local.joinpath(*parts)

    @property
    def files(self) -> Folder:
        """The folder's files, on a disk or on object storage."""
        return Folder(self.uri)

    @property
    def stopped(self) -> str:
        return f"{self.uri}/{STOPPED_FILE}"

    @property
    def best_marker(self) -> str:
        return f"{self.uri}/{BEST_DIR}/{BEST_FILE}"

    @property
    def best(self) -> str:
        return f"{self.uri}/{BEST_DIR}"

    @property
    def samples(self) -> Path | None:
        return self._local_part(SAMPLES_DIR)

    @property
    def lock(self) -> Path | None:
        return self._local_part(LOCK_FILE)

    @property
    def pending(self) -> Path:
        """Where undelivered MLflow items wait: in the run folder, or (for a run on object storage) in this node's
        cache, from where pipelines.tracking.kept moves them into the run's prefix."""
        if self.remote:
            # named by the run's URL too: runs of one name in two buckets must not share it
            return user_cache() / PENDING_DIR / f"{self.name}-{hashlib.sha256(self.uri.encode()).hexdigest()[:8]}"
        return self.local / PENDING_DIR

    def ray_latest(self) -> str | None:
        """The folder name of the run's latest checkpoint in Ray's snapshot, or None when Ray would start afresh."""
        try:
            latest = json.loads(self.files.read_text(RAY_SNAPSHOT) or "{}").get("latest_checkpoint_result")
        except (OSError, ValueError, AttributeError):
            return None
        return latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None

    def resume_world(self) -> int | None:
        """The world size recorded in the checkpoint Ray Train would restart this run from (its snapshot's
        latest: a checkpoint on storage counts only once Ray Train has taken the worker's report), or None."""
        name = self.ray_latest()
        try:
            return (
                load_checkpoint_in(self.files, f"{name}/{CHECKPOINT_FILE}", name)["extra"].get("world_size")
                if name
                else None
            )
        except CheckpointError:  # pruned between the snapshot and the read
            return None

    def checkpoints_before(self, name: str) -> list[str]:
        """The checkpoint folders older than `name`, newest first (Ray names them checkpoint_<date>_<time>.<us>,
        which sort in time order)."""
        return sorted((d for d in self.files.dirs("checkpoint_*") if d < name), reverse=True)

    def checkpoint_file(self, checkpoint: str) -> str:
        """The checkpoint file in the checkpoint folder `checkpoint`: a path, or a URL on object storage."""
        return f"{self.uri}/{checkpoint}/{CHECKPOINT_FILE}"


def find_checkpoint(path: str) -> Path:
    """The checkpoint file at `path`: the file itself, <dir>/checkpoint.pt, or the newest checkpoint_* of a run."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if (p / CHECKPOINT_FILE).is_file():
        return p / CHECKPOINT_FILE
    found = (
        sorted(d / CHECKPOINT_FILE for d in p.glob("checkpoint_*") if (d / CHECKPOINT_FILE).is_file())
        if p.is_dir()
        else []
    )
    if not found:
        raise UsageError(
            f"no checkpoint at {p}: give a checkpoint.pt, a checkpoint_* directory or a run directory holding them"
        )
    return found[-1]  # Ray names checkpoints by time: the last in order is the newest


def load_checkpoint_at(spec: str) -> tuple[dict, str]:
    """The checkpoint at `spec`, a path or an object-storage URL (the file, its checkpoint_* folder, or a run
    folder: its newest), loaded without executing code from it, and where it was found. On object storage the
    file is downloaded once to a temporary copy; a message names the URL, never that copy."""
    if not is_remote(spec):
        path = find_checkpoint(spec).resolve()
        return load_checkpoint(path), str(path)
    url = spec.rstrip("/")
    files = Folder(url)
    if files.size() is not None:  # the file itself
        folder, name = url.rpartition("/")[0], url.rpartition("/")[2]
    elif files.size(CHECKPOINT_FILE) is not None:
        folder, name = url, CHECKPOINT_FILE
    else:
        found = [d for d in files.dirs("checkpoint_*") if files.size(d, CHECKPOINT_FILE) is not None]
        if not found:
            raise UsageError(
                f"no checkpoint at {url}: give a checkpoint.pt, a checkpoint_* prefix or a run prefix holding them"
            )
        folder, name = f"{url}/{found[-1]}", CHECKPOINT_FILE  # Ray names checkpoints by time: the last is newest
    return load_checkpoint_in(Folder(folder), name, f"{folder}/{name}"), f"{folder}/{name}"


def load_checkpoint_in(files: Folder, name: str, where: str, map_location="cpu") -> dict:
    """The checkpoint file `name` of the folder `files` (a disk or object storage: through a temporary copy),
    loaded without executing code from it; a CheckpointError names `where`, never the copy."""
    with files.local_copy(name) as copy:
        if copy is None:
            raise CheckpointError(f"checkpoint {where} does not exist")
        try:
            return load_checkpoint(copy, map_location=map_location)
        except CheckpointError as e:
            raise CheckpointError(str(e).replace(str(copy), where)) from None
