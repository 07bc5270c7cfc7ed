"""What every entry point needs around the library: paths Ray workers can use, MLflow's store, run tags."""

import json
import os
import subprocess
import tempfile
from pathlib import Path

from sagan.errors import UsageError, UserError, first_line

CHECKPOINT_FILE = "checkpoint.pt"


def absolute(path: str | None) -> str | None:
    """Local paths made absolute (Ray workers run in another directory); URIs (s3://...) and "" as they are."""
    return path if not path or "://" in path else str(Path(path).expanduser().resolve())


def default_tracking_uri(configured: str | None = None) -> str:
    """`configured`, else MLFLOW_TRACKING_URI, else a sqlite file at an absolute path in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


class TrackingError(UserError, RuntimeError):
    """The MLflow store cannot be reached; the message says which and the fix."""


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError within `timeout` seconds when the MLflow store at `uri` is out of reach: MLflow's
    own client retries an unreachable server for minutes before it fails, with nothing printed."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            return  # it answered (an auth proxy, an older server without /health): it is there
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"MLflow tracking server {uri} did not answer within {timeout:g}s ({reason}); start it "
                "(mlflow server --host 0.0.0.0 --port 5000 ...) or set mlflow.tracking_uri to a "
                "reachable server or a sqlite:///ABSOLUTE/PATH.db file"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).expanduser().resolve().parent
        if not folder.is_dir():
            raise TrackingError(
                f"MLflow store {uri}: the folder {folder} does not exist; create it or set "
                "mlflow.tracking_uri to another sqlite:/// file or a tracking server"
            )


def prepare_tracking(uri: str, experiment: str) -> str:
    """Create the MLflow store and experiment from the driver, so workers never race on a schema migration.
    Returns the experiment id; TrackingError when the store cannot be used. A new experiment in a sqlite store keeps its artifacts next to the database
    file (mlartifacts/<experiment>), not in ./mlruns of whatever directory the process started in."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
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
    except Exception as e:  # noqa: BLE001 - any failure to reach the store is the user's to fix
        raise TrackingError(f"MLflow tracking at {uri} is not usable: {first_line(e)}") from None


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


def pick_device(name: str):
    """cuda when asked for or (auto) available, else cpu; UsageError for cuda on a machine without it."""
    import torch

    if name not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {name} is not one of auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda but torch sees no GPU here; use --device cpu, or submit with --entrypoint-num-gpus 1"
        )
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def check_writable(folder: Path, flag: str) -> None:
    """UsageError unless files can be created in `folder` (made when missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(
            f"{flag} {folder} is not a writable folder ({e.strerror or first_line(e)}); choose another"
        ) from None
