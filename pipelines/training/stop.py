"""A run stopped for good (a non-finite loss, a divergence, a damaged shard): the reason recorded in the run
folder, so Ray's retries and later launches stop at once with the same line.
"""

import json

from pipelines.common.config import Config
from pipelines.common.run_folder import STOPPED_FILE, RunFolder
from sagan.errors import JobFailed


class RunStopped(JobFailed, RuntimeError):
    """The run cannot go on and a retry would not help (a non-finite loss, a divergence, a damaged shard); the
    message is one line naming the step or the file."""


def stop_marker(cfg: Config) -> str:
    """Where a stopped run records why: a path, or a URL on object storage."""
    return RunFolder.of(cfg).stopped


def stop_run(cfg: Config, message: str) -> RunStopped:
    """Record `message` for the retries and the driver, and return the error to raise. Every rank that stops
    writes it (the same message where they agreed), so it is there whichever rank Ray tears down first."""
    message += f". Fix the cause and start a new run.name (or delete {stop_marker(cfg)} to resume this one)"
    files = RunFolder.of(cfg).files
    files.make_folder()
    files.write_text(STOPPED_FILE, json.dumps({"message": message}))  # a reader never sees half a file
    return RunStopped(message)


def raise_if_stopped(cfg: Config) -> None:
    """Raise RunStopped when this run was stopped already, so a retry ends at once instead of replaying it."""
    text = RunFolder.of(cfg).files.read_text(STOPPED_FILE)
    if text is not None:
        raise RunStopped(json.loads(text)["message"])
