"""What every entry point needs around the library: paths Ray workers can use, MLflow's store, run tags."""

import json
import os
import subprocess
from pathlib import Path


def absolute(path: str | None) -> str | None:
    """Local paths made absolute (Ray workers run in another directory); URIs (s3://...) and "" as they are."""
    return path if not path or "://" in path else str(Path(path).expanduser().resolve())


def default_tracking_uri(configured: str | None = None) -> str:
    """`configured`, else MLFLOW_TRACKING_URI, else a sqlite file at an absolute path in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def prepare_tracking(uri: str, experiment: str) -> str:
    """Create the MLflow store and experiment from the driver, so workers never race on a schema migration.
    Returns the experiment id. A new experiment in a sqlite store keeps its artifacts next to the database
    file (mlartifacts/<experiment>), not in ./mlruns of whatever directory the process started in."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts" / experiment).as_uri()
        try:
            mlflow.create_experiment(experiment, artifact_location=location)
        except MlflowException:  # another process created it in the meantime
            pass
    return mlflow.set_experiment(experiment).experiment_id


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


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
