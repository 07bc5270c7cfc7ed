"""Where a run came from, for its MLflow tags: the git commit, the Ray job submission id."""

import json
import os
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """The repository's HEAD commit, or None outside a git checkout (a Ray job's uploaded working dir)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except OSError:
        return None


def ray_job_id() -> str | None:
    """The submission id (raysubmit_...) when this process runs as `ray job submit`'s entrypoint, else None."""
    # The job supervisor hands the entrypoint its JobConfig, whose metadata carries the submission id.
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None
