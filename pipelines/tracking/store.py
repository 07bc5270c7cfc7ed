"""The MLflow store: its URI, reaching it within seconds, the experiment, and the one MLflow run of each training
run (opened by the driver before any worker starts, found again when the run resumes, ended however it ends).

MLflow is imported inside the functions that talk to the store, not at the top: train.py and tune.py import
this module before their checks, which refuse a bad launch without paying MLflow's import (about a second or
more; benchmarks/import_times.py).
"""

import json
import logging
import os
import sqlite3
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path

from pipelines.tracking.delivery import bound_requests, brief_error
from pipelines.tracking.pending import spill
from sagan.errors import UserError, first_line

log = logging.getLogger("sagan.tracking")
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3 UI: "Model training"


def default_tracking_uri(configured: str | None = None) -> str:
    """`configured`, else MLFLOW_TRACKING_URI, else a sqlite file in the working directory; a relative file or
    folder made absolute here, on the driver (`absolute_tracking_uri`)."""
    return absolute_tracking_uri(
        configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    )


def absolute_tracking_uri(uri: str) -> str:
    """`uri` with a relative sqlite file (sqlite:///rel.db) or local folder made absolute: Ray's workers run in
    another directory, where the same relative path names another, empty store that has no such run."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and ":memory:" not in uri:
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).expanduser().resolve()}"
    if ":" not in uri and not uri.startswith("databricks"):  # a plain folder: MLflow's file store
        return str(Path(uri).expanduser().resolve())
    return uri


def refused_everything(uri: str, run_id: str, pending: Path) -> str | None:
    """One line when the store took none of the run's metrics and refused items of it (set aside in
    `pending`), else None: a run whose record was lost must not end as if all were well."""
    rejected = pending / f"rejected-{run_id}.txt"
    if not rejected.is_file():
        return None
    import mlflow  # lazy: see the module docstring

    try:
        if mlflow.MlflowClient(uri).get_run(run_id).data.metrics:
            return None  # some arrived: the items refused were warned of one by one
    except Exception:  # noqa: BLE001 - the store is away: the outage was reported, the items are kept
        return None
    lines = rejected.read_text().splitlines()
    first = json.loads(lines[0]).get("error", "?") if lines else "?"
    return (
        f"MLflow at {uri} took no metric of run {run_id} and refused {len(lines)} item(s) (first: {first}); "
        f"they are set aside in {rejected}"
    )


class TrackingError(UserError, RuntimeError):
    """The MLflow store cannot be reached; the message says which and the fix."""


def check_tracking(uri: str, timeout: float = 5.0, setting: str = "set mlflow.tracking_uri") -> None:
    """Raise TrackingError within `timeout` seconds when the MLflow store at `uri` is out of reach: MLflow's
    own client retries an unreachable server for minutes before it fails, with nothing printed. `setting`: how
    the user chooses another store (the config key, or a script's flag)."""
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            return  # it answered (an auth proxy, an older server without /health): it is there
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"MLflow tracking server {uri} did not answer within {timeout:g}s ({reason}); start it "
                f"(mlflow server --host 0.0.0.0 --port 5000 ...) or {setting} to a "
                "reachable server or a sqlite:///ABSOLUTE/PATH.db file"
            ) from None
    elif uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :]).expanduser().resolve()
        folder, fix = path.parent, f"{setting} to another sqlite:/// file or a tracking server"
        if not folder.is_dir():
            raise TrackingError(f"MLflow store {uri}: the folder {folder} does not exist; create it or {fix}")
        if path.is_dir():
            raise TrackingError(f"MLflow store {uri}: {path} is a folder, not a database file; {fix}")
        if path.exists():  # MLflow would fail only at its first query, after Ray started and the shards were hashed
            try:
                with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=timeout)) as db:
                    db.execute("PRAGMA schema_version").fetchone()
            except sqlite3.DatabaseError as e:
                raise TrackingError(
                    f"MLflow store {uri}: {path} is not a usable sqlite database ({e}); {fix}"
                ) from None
        elif not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: the folder {folder} is not writable; {fix}")


def prepare_tracking(uri: str, experiment: str) -> str:
    """Create the MLflow store and experiment from the driver, so workers never race on a schema migration.
    Returns the experiment id; TrackingError when the store cannot be used. A new experiment in a sqlite store keeps its artifacts next to the database
    file (mlartifacts/<experiment>), not in ./mlruns of whatever directory the process started in."""
    import mlflow  # lazy: see the module docstring
    from mlflow.exceptions import MlflowException  # lazy: see the module docstring

    try:
        mlflow.set_tracking_uri(uri)
        if mlflow.get_experiment_by_name(experiment) is None:
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts" / experiment).as_uri()
            try:
                # The kind MLflow's UI opens the experiment as: runs and charts, not its GenAI views.
                mlflow.create_experiment(experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
            except MlflowException:  # another process created it in the meantime
                pass
        return mlflow.set_experiment(experiment).experiment_id
    except Exception as e:  # noqa: BLE001 - any failure to reach the store is the user's to fix
        raise TrackingError(f"MLflow tracking at {uri} is not usable: {first_line(e)}") from None


# ---------------------------------------------------------------- the driver's side: one MLflow run per run.name


def find_run(client, experiment_id: str, newest: bool = False, **tags) -> str | None:
    """The id of the run in the experiment carrying all of `tags` (the oldest, or the newest), or None."""
    quoted = {k: str(v).replace("\\", "\\\\").replace("'", "\\'") for k, v in tags.items()}
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in quoted.items())
    order = "DESC" if newest else "ASC"
    runs = client.search_runs([experiment_id], query, order_by=[f"attributes.start_time {order}"], max_results=1)
    return runs[0].info.run_id if runs else None


def log_params(client, run_id: str, params: dict) -> None:
    """Log `params` (values as strings, at most 6000 characters) in batches of 100, MLflow's limit."""
    from mlflow.entities import Param  # lazy: see the module docstring

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def open_run(
    tracking_uri: str, experiment_id: str, run_name: str, location: str, params: dict, tags: dict, continuing: bool
) -> str:
    """The MLflow run of the training run at `location` (storage/run.name), made by the driver before any
    worker starts, so a retry after a worker failure logs into the same run. A run that resumes from a
    checkpoint (`continuing`) continues the newest MLflow run of that location (status RUNNING again);
    otherwise a new run with `params` and `tags`."""
    import mlflow  # lazy: see the module docstring

    client = mlflow.MlflowClient(tracking_uri)
    tags = {"checkpoint_location": location, **{k: str(v) for k, v in tags.items() if v}}
    found = find_run(client, experiment_id, newest=True, checkpoint_location=location) if continuing else None
    if found:
        client.update_run(found, status="RUNNING")
        for k in ("ray_job_id", "git_commit"):  # this launch's
            if k in tags:
                client.set_tag(found, k, tags[k])
        return found
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def end_run(tracking_uri: str, run_id: str, status: str, spill_to: Path) -> None:
    """Set the run's status now, or, with the store out of reach, leave it in the pending file for replay."""
    import mlflow  # lazy: see the module docstring

    bound_requests()
    try:
        mlflow.MlflowClient(tracking_uri).set_terminated(run_id, status)
    except Exception as e:  # noqa: BLE001 - the run's outcome stands; its record follows when the store is back
        spill(spill_to, tracking_uri, run_id, [{"kind": "terminate", "status": status}])
        log.warning(
            f"MLflow at {tracking_uri} did not take status {status} of run {run_id} ({brief_error(e)}); "
            f"kept in {spill_to}"
        )
