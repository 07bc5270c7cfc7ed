"""Deliver the MLflow metrics, tags, images and statuses a training run kept while its tracking store was
out of reach (`<run dir>/mlflow-pending/`). The next launch of the same run.name does this by itself.

    python pipelines/replay_tracking.py runs/sagan-demo
    python pipelines/replay_tracking.py runs/sagan-demo --tracking-uri http://mlflow.internal:5000
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.common.run_folder import PENDING_DIR, RAY_SNAPSHOT, STOPPED_FILE
from pipelines.tracking.pending import replay
from pipelines.tracking.store import check_tracking
from sagan.errors import JobFailed, UsageError, command


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
    folder = Path(args.run_dir).expanduser().resolve()
    if not folder.is_dir() or not (is_run_folder(folder) or not any(folder.iterdir())):
        raise UsageError(
            f"{args.run_dir} is not a run folder: give run.storage_path/run.name of a run (or its {PENDING_DIR}/ "
            "folder, or the folder a warning named)"
        )
    folder = folder if folder.name == PENDING_DIR or any(folder.glob("*.jsonl")) else folder / PENDING_DIR
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        print(f"nothing to deliver: no pending MLflow items in {folder}")
        return 0
    if args.tracking_uri:
        check_tracking(args.tracking_uri, setting="give --tracking-uri")
    delivered, set_aside, left = replay(folder, args.tracking_uri)
    aside = f"; {set_aside} set aside (unreadable or refused, listed in {folder}/rejected-*.txt)" if set_aside else ""
    print(f"delivered {delivered} item(s) from {len(files)} file(s) in {folder}{aside}")
    if left:
        raise JobFailed(
            f"{left} item(s) not delivered (the store is still out of reach?); they stay in {folder}: run this "
            "again when it is back"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
