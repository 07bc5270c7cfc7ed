"""A run stopped for good (a non-finite loss, a divergence, a damaged shard): the reason recorded in the run
folder, so Ray's retries and later launches stop at once with the same line.
"""

import json
import os
from pathlib import Path

from pipelines.common.config import Config
from pipelines.common.run_folder import RunFolder
from sagan.errors import JobFailed


class RunStopped(JobFailed, RuntimeError):
    """The run cannot go on and a retry would not help (a non-finite loss, a divergence, a damaged shard); the
    message is one line naming the step or the file."""


def stop_marker(cfg: Config) -> Path | None:
    """Where a stopped run records why (local storage only), or None for remote storage."""
    return RunFolder.of(cfg).stopped


def stop_run(cfg: Config, message: str) -> RunStopped:
    """Record `message` for the retries and the driver, and return the error to raise. Every rank that stops
    writes it (the same message where they agreed), so it is there whichever rank Ray tears down first."""
    marker = stop_marker(cfg)
    if marker is not None:
        message += f". Fix the cause and start a new run.name (or delete {marker} to resume this one)"
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"message": message}))
        os.replace(tmp, marker)  # a reader never sees half a file
    return RunStopped(message)


def raise_if_stopped(cfg: Config) -> None:
    """Raise RunStopped when this run was stopped already, so a retry ends at once instead of replaying it."""
    marker = stop_marker(cfg)
    if marker and marker.is_file():
        raise RunStopped(json.loads(marker.read_text())["message"])
