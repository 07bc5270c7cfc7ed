"""The pending MLflow items of a run on object storage, kept in the run's own prefix (`<run>/mlflow-pending/`),
where every node of its next launch, and `replay_tracking.py` on any machine, finds them.

Items are spilled to a local disk first (`RunFolder.pending`, in the node's cache: a spill appends to its file,
which an object cannot do). `keep` moves them into the bucket once the process that spilled them is done with
them; `gather` moves the bucket's items back into the local folder before a delivery. A file of one name in both
places is joined, the bucket's lines first: they were spilled before. On a disk both do nothing.
"""

from pathlib import Path

from pipelines.common.run_folder import PENDING_DIR, RunFolder
from pipelines.tracking.pending import deliver_pending
from sagan.files import atomic_output
from sagan.folder import TEMP_PATTERN, Folder

TEXT = (".jsonl", ".txt")  # the pending files and the set-aside ones, joined line by line


def _bucket(run: RunFolder) -> Folder:
    return Folder(f"{run.uri}/{PENDING_DIR}")


def _temporary(name: str) -> bool:  # a write in progress, or one cut short
    return Path(name).match(TEMP_PATTERN) or name.endswith(".tmp")


def gather(run: RunFolder) -> Path:
    """The run's local pending folder, holding the bucket's pending items too (taken out of the bucket)."""
    local = run.pending
    if not run.remote:
        return local
    bucket = _bucket(run)
    for name in sorted(bucket.files("", "*")):  # a spill's images sort before its .jsonl ("-" < ".")
        if _temporary(name):
            continue
        target = local / name
        if name.endswith(TEXT):
            mine = target.read_text() if target.is_file() else ""
            with atomic_output(target) as tmp:
                tmp.write_text((bucket.read_text(name) or "") + mine)
        else:
            bucket.download(name, str(target))
        bucket.remove(name)  # only once the local copy is complete
    return local


def keep(run: RunFolder) -> int:
    """Move the local pending folder's items into the run's prefix on object storage; the files moved."""
    local = run.pending
    if not run.remote or not local.is_dir():
        return 0
    bucket, moved = _bucket(run), 0
    for path in sorted(local.iterdir()):
        if not path.is_file() or _temporary(path.name):
            continue
        if path.name.endswith(TEXT):
            bucket.write_text(path.name, (bucket.read_text(path.name) or "") + path.read_text())
        else:
            bucket.upload(path.name, str(path))
        path.unlink()  # only once the object is complete
        moved += 1
    if not any(local.iterdir()):
        local.rmdir()
    return moved


def deliver_kept(run: RunFolder, uri: str, whose: str) -> None:
    """Deliver the run's pending items, wherever they wait (`deliver_pending`); what the store does not take
    goes back to the run's prefix on object storage."""
    try:
        deliver_pending(gather(run), uri, whose, shown=f"{run.uri}/{PENDING_DIR}" if run.remote else None)
    finally:
        keep(run)
