"""The pending MLflow items of a run on object storage, kept in the run's own prefix (`<run>/mlflow-pending/`),
where every node of its next launch, and `replay_tracking.py` on any machine, finds them.

Items are spilled to a local disk first (`RunFolder.pending`, in the node's cache: a spill appends to its file,
which an object cannot do). `keep` moves the local files into the bucket, each as a new object that is never
rewritten (`<run id>~<time>-<random>.jsonl`, images under their own unique names); `gather` joins the bucket's
parts into the local folder, in the order they were kept and before the lines spilled here, and removes exactly
the objects it read. Two processes keeping and gathering at once (a launch and a replay elsewhere) so lose
nothing; a crash between a copy and its removal may deliver an item twice, never drop one.

The bucket can fail too: `keep_safely`, `gather_safely` and `deliver_kept` then warn, naming the folder on this
node where the items stay, and never turn a run's outcome into a storage error. On a disk all of this is a no-op.
"""

import logging
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from pipelines.common.run_folder import PENDING_DIR, RunFolder
from pipelines.tracking.pending import deliver_pending
from sagan.files import atomic_output
from sagan.folder import TEMP_PATTERN, Folder

log = logging.getLogger("sagan.tracking")

TEXT = (".jsonl", ".txt")  # the pending files and the set-aside ones, joined line by line
PART = "~"  # <name>~<time ns>-<random><suffix>: one kept part of the text file <name><suffix>


def shown(run: RunFolder) -> str | None:
    """Where the run's pending items end up, for messages: its prefix on object storage; None on a disk (the
    local folder itself)."""
    return f"{run.uri}/{PENDING_DIR}" if run.remote else None


def bucket_of(run: RunFolder) -> Folder:
    return Folder(f"{run.uri}/{PENDING_DIR}")


def _temporary(name: str) -> bool:  # a write in progress, or one cut short
    return Path(name).match(TEMP_PATTERN) or name.endswith(".tmp") or name.startswith(".")


def _whole(name: str) -> str:
    """The text file a part object belongs to: a~123-ab.jsonl -> a.jsonl."""
    stem, suffix = os.path.splitext(name)
    return stem.split(PART)[0] + suffix


def gather(run: RunFolder) -> Path:
    """The run's local pending folder, holding the bucket's pending items too (taken out of the bucket)."""
    local = run.pending
    if not run.remote:
        return local
    bucket = bucket_of(run)
    names = sorted(n for n in bucket.files("", "*") if not _temporary(n))
    parts: dict[str, list[str]] = {}
    for name in names:
        if name.endswith(TEXT):
            parts.setdefault(_whole(name), []).append(name)  # in the order kept: the names sort by time
        else:  # an image: its name is unique already
            bucket.download(name, str(local / name))
            bucket.remove(name)
    for whole, pieces in parts.items():  # after the images its lines name
        target = local / whole
        mine = target.read_text() if target.is_file() else ""
        with atomic_output(target) as tmp:
            tmp.write_text("".join(bucket.read_text(p) or "" for p in pieces) + mine)
        for piece in pieces:
            bucket.remove(piece)  # only what was read, once the local file holds it
    return local


def keep(run: RunFolder) -> int:
    """Move the local pending folder's items into the run's prefix on object storage; the files moved."""
    local = run.pending
    if not run.remote or not local.is_dir():
        return 0
    bucket, moved = bucket_of(run), 0
    for path in sorted(local.iterdir()):  # a spill's images sort before its .jsonl ("-" < ".")
        if not path.is_file() or _temporary(path.name):
            continue
        name = path.name
        if name.endswith(TEXT):
            stem, suffix = os.path.splitext(name)
            name = f"{stem}{PART}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{suffix}"
        bucket.upload(name, str(path))
        path.unlink()  # only once the object is complete
        moved += 1
    if not any(local.iterdir()):
        local.rmdir()
    return moved


def keep_safely(run: RunFolder) -> None:
    """`keep`, with a failing store a warning: the items stay in this node's folder, which it names."""
    try:
        keep(run)
    except OSError as e:
        log.warning(
            f"could not move kept MLflow items to {run.uri}/{PENDING_DIR} ({str(e).splitlines()[0]}); they stay in "
            f"{run.pending} on this node: `python pipelines/replay_tracking.py {run.pending}` there delivers them"
        )


@contextmanager
def pending_here(run: RunFolder):
    """This node's pending folder of the run for the block, with the bucket's items gathered into it, and what is
    left moved back afterwards; a failing store is a warning (see keep_safely)."""
    try:
        local = gather(run)
    except OSError as e:
        local = run.pending
        log.warning(f"could not read the kept MLflow items in {run.uri}/{PENDING_DIR} ({str(e).splitlines()[0]})")
    try:
        yield local
    finally:
        keep_safely(run)


def deliver_kept(run: RunFolder, uri: str, whose: str) -> None:
    """Deliver the run's pending items, wherever they wait (`deliver_pending`); what the store does not take
    goes back to the run's prefix on object storage. A warning, never an error."""
    with pending_here(run) as local:
        deliver_pending(local, uri, whose, shown=shown(run))
