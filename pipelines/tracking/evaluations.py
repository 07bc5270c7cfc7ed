"""Evaluation results in MLflow: the run an evaluation logs into (the training run's, checked before any sample
is generated), and the scores, settings, sample grid and a JSON record of each evaluation."""

import hashlib
import json
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from pipelines.common.provenance import git_commit, ray_job_id
from pipelines.tracking.store import check_tracking, default_tracking_uri, prepare_tracking
from sagan.errors import UsageError, first_line


def evaluation_target(cfg, extra: dict, run_id: str | None = None) -> tuple[str, str | None]:
    """(tracking URI, run id to log into or None): `run_id`, else the training run's recorded in the checkpoint's
    `extra`, or None for a new run; checked now,
    so an unreachable store or a missing run stops the job before any sample is generated."""
    uri = default_tracking_uri(cfg.mlflow.tracking_uri or extra.get("mlflow_tracking_uri"))
    run_id = run_id or extra.get("mlflow_run_id")
    fix = "pass mlflow.tracking_uri=URI of the training store, or --run-id"
    if run_id and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UsageError(f"MLflow run {run_id} is not in {uri}: that store does not exist; {fix}")
    check_tracking(uri)  # seconds; MLflow's client would retry an unreachable server for minutes
    client = mlflow.MlflowClient(uri)
    try:
        if run_id:
            client.get_run(run_id)
        else:
            client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - a missing run and an unreachable store have the same fix
        where = f"MLflow run {run_id} is not in {uri}" if run_id else f"MLflow store {uri} is not usable"
        raise UsageError(f"{where} ({first_line(e)}); {fix}") from None
    return uri, run_id


def log_evaluation(
    uri: str, run_id: str | None, cfg, ckpt: Path, step: int, scores: dict, grid, raw: bool, experiment: str
) -> str:
    """Metrics at `step`, settings as params, a sample grid and a JSON record into the run (None: a new run in
    `experiment`, tagged with the checkpoint); returns its id. `raw`: the trained G was scored, not its EMA."""
    client = mlflow.MlflowClient(uri)
    settings = {
        "num_samples": cfg.eval.num_samples,
        "feature_extractor": cfg.eval.feature_extractor,
        "real_split": cfg.eval.real_split,
        "generator": "raw" if raw else "ema",
        "seed": cfg.eval.seed,
        "checkpoint": str(ckpt),
    }
    new_run = run_id is None
    if new_run:
        exp = client.get_experiment(prepare_tracking(uri, experiment))  # artifacts next to a sqlite store
        tags = {"checkpoint": str(ckpt), "git_commit": git_commit(), "ray_job_id": ray_job_id()}
        run_id = client.create_run(
            exp.experiment_id, run_name=f"eval-{cfg.run.name}-step{step}", tags={k: v for k, v in tags.items() if v}
        ).info.run_id
    # The training run's params already hold its config's eval.* keys: settings of an evaluation go by step.
    prefix = "eval." if new_run else f"eval_step_{step}."
    now = mlflow.utils.time.get_current_time_millis()
    client.log_batch(run_id, metrics=[Metric(f"eval/{k}", v, now, step) for k, v in scores.items()])
    # One record per step and settings, so a re-evaluation with other settings keeps both.
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    record = f"evaluations/step_{step:06d}-{digest}.json"
    client.log_dict(run_id, {"step": step, "settings": settings, "scores": scores}, record)
    try:
        client.log_batch(run_id, params=[Param(prefix + k, str(v)) for k, v in settings.items()])
    except MlflowException as e:
        if e.error_code != "INVALID_PARAMETER_VALUE":
            raise
        print(
            f"note: step {step} was evaluated before with other settings (params keep the first); this one is {record}"
        )
    client.log_image(run_id, grid, key="eval_samples", step=step)
    if new_run:
        client.set_terminated(run_id)
    return run_id
