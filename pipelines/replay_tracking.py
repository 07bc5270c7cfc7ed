"""Deliver the MLflow metrics, tags, images and statuses a training run kept while its tracking store was
out of reach (`<run dir>/mlflow-pending/`). The next launch of the same run.name does this by itself.

    python pipelines/replay_tracking.py runs/sagan-demo
    python pipelines/replay_tracking.py runs/sagan-demo --tracking-uri http://mlflow.internal:5000
    python pipelines/replay_tracking.py s3://bucket/runs/sagan-imagenet128   # a run on object storage

A run on object storage keeps them in its prefix (`s3://.../mlflow-pending/`): they are delivered from any
machine with the store's keys (AWS_* variables), and what the tracking store does not take stays there.
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.common.run_folder import PENDING_DIR, RAY_SNAPSHOT, STOPPED_FILE, RunFolder
from pipelines.tracking.kept import pending_here
from pipelines.tracking.pending import replay
from pipelines.tracking.store import check_tracking
from sagan.errors import JobFailed, UsageError, command
from sagan.folder import Folder
from sagan.storage import check_storage, is_url


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` holds a run's parts, or is the pending folder of one (pending items, or set-aside ones)."""
    parts = [PENDING_DIR, RAY_SNAPSHOT, STOPPED_FILE, "checkpoint_*", "*.jsonl", "rejected-*.txt"]
    return any(next(folder.glob(pattern), None) for pattern in parts)


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="replay_tracking.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir", help=f"the run directory (run.storage_path/run.name) or its {PENDING_DIR}/ folder")
    p.add_argument("--tracking-uri", default=None, help="deliver to this store instead of the one the run logged to")
    args = p.parse_args(argv)
    if is_url(args.run_dir):
        return replay_remote(args.run_dir.rstrip("/").removesuffix(f"/{PENDING_DIR}"), args.tracking_uri)
    folder = Path(args.run_dir).expanduser().resolve()
    if not folder.is_dir() or not (is_run_folder(folder) or not any(folder.iterdir())):
        raise UsageError(
            f"{args.run_dir} is not a run folder: give run.storage_path/run.name of a run (or its {PENDING_DIR}/ "
            "folder, or the folder a warning named)"
        )
    folder = folder if folder.name == PENDING_DIR or any(folder.glob("*.jsonl")) else folder / PENDING_DIR
    return deliver(folder, str(folder), args.tracking_uri)


def replay_remote(url: str, tracking_uri: str | None) -> int:
    """Deliver the pending items in the prefix of the run at `url` (object storage); the rest stay there."""
    storage, _, name = url.rpartition("/")
    if "/" not in url.split("://", 1)[1]:
        raise UsageError(f"{url} is a bucket, not a run folder: give run.storage_path/run.name (s3://BUCKET/runs/NAME)")
    check_storage(url, "the run folder")  # the endpoint, keys and bucket: one line within seconds
    run = Folder(url)
    if not (run.dirs("*") or run.files("", "*")):
        raise UsageError(f"{url} is not a run folder: nothing is stored under it; give run.storage_path/run.name")
    if tracking_uri:  # before any item moves
        check_tracking(tracking_uri, setting="give --tracking-uri")
    with pending_here(RunFolder(storage, name)) as local:  # what is not delivered goes back to the bucket
        return deliver(local, f"{url}/{PENDING_DIR}", tracking_uri)


def deliver(folder: Path, shown: str, tracking_uri: str | None) -> int:
    """Replay the pending files in `folder` (named `shown` in messages); 0, or JobFailed when some are left."""
    files = sorted(p for p in folder.glob("*.jsonl") if not p.name.startswith("."))
    if not files:
        print(f"nothing to deliver: no pending MLflow items in {shown}")
        return 0
    if tracking_uri:
        check_tracking(tracking_uri, setting="give --tracking-uri")
    delivered, set_aside, left = replay(folder, tracking_uri)
    aside = f"; {set_aside} set aside (unreadable or refused, listed in {shown}/rejected-*.txt)" if set_aside else ""
    print(f"delivered {delivered} item(s) from {len(files)} file(s) in {shown}{aside}")
    if left:
        raise JobFailed(
            f"{left} item(s) not delivered (the store is still out of reach?); they stay in {shown}: run this "
            "again when it is back"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
