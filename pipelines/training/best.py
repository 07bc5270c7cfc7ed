"""The best checkpoint by in-loop FID, kept in `<run dir>/best/` beside Ray's latest N."""

import json
import os
import tempfile
from pathlib import Path

from pipelines.common.config import Config
from pipelines.common.run_folder import BEST_DIR, BEST_FILE, CHECKPOINT_FILE, RunFolder, is_remote
from sagan.checkpoint import save_checkpoint
from sagan.folder import Folder
from sagan.step import Trainer


def best_so_far(cfg: Config, from_checkpoint: dict | None) -> dict | None:
    """The better of the best recorded in the checkpoint resumed from and <run dir>/best/best.json, which may be
    newer (an evaluation after that checkpoint): a resumed run must not replace a better best with a worse."""
    found = [from_checkpoint] if from_checkpoint else []
    try:
        found.append(json.loads(RunFolder.of(cfg).files.read_text(BEST_DIR, BEST_FILE) or "null"))
    except ValueError:
        pass
    found = [b for b in found if isinstance(b, dict) and isinstance(b.get("loop/fid"), (int, float))]
    return min(found, key=lambda b: b["loop/fid"]) if found else None


def save_best(target: str, cfg: Config, trainer: Trainer, extra: dict) -> None:
    """Write the best checkpoint so far to `target` (checkpoint.pt, then best.json), replacing the last one.
    Ray's retention keeps the latest run.keep_checkpoints; this one is kept beside them whatever its age."""
    info = json.dumps(extra["best"])
    if not is_remote(target):
        save_checkpoint(Path(target) / CHECKPOINT_FILE, trainer, cfg, extra=extra)  # atomic: temp file + rename
        tmp = Path(target) / ".best.json.tmp"
        tmp.write_text(info)
        os.replace(tmp, Path(target) / BEST_FILE)
        return

    with tempfile.TemporaryDirectory() as tmp:  # the checkpoint first, then the record naming it
        save_checkpoint(Path(tmp) / CHECKPOINT_FILE, trainer, cfg, extra=extra)
        files = Folder(target)
        files.upload(CHECKPOINT_FILE, str(Path(tmp) / CHECKPOINT_FILE))
        files.write_text(BEST_FILE, info)
