"""One trial of the sweep, in Tune's trial process: a training run (the same TorchTrainer as pipelines/train.py)
with the trial's hyper-parameters, named after the trial id so that a restored sweep resumes it from its
checkpoint, logged as a child run of the sweep's parent run in MLflow (found again by tags, so a resumed sweep
adds none), with rank 0's reports forwarded to Tune for ASHA.
"""

import sys
from pathlib import Path

import mlflow
from ray import tune
from ray.train import TrainingFailedError
from ray.tune.integration.ray_train import TuneReportCallback

from pipelines.common.config import Config, from_dict
from pipelines.common.provenance import git_commit, ray_job_id
from pipelines.common.run_folder import RunFolder
from pipelines.sweep.space import DRIVER_CPU, lr_d_of, trial_config
from pipelines.tracking.delivery import bound_requests
from pipelines.tracking.kept import deliver_kept
from pipelines.tracking.store import find_run, log_params
from pipelines.training.placement import PlacementTimeout, fit
from pipelines.training.preflight import PreflightError
from pipelines.training.resume import check_resume
from pipelines.training.stop import RunStopped, raise_if_stopped
from pipelines.training.trainer import build_trainer
from sagan.config import flatten, to_dict
from sagan.errors import first_line

SWEEP_TAG, TRIAL_TAG, ROLE_TAG, REASON_TAG = "sagan.sweep", "sagan.trial_id", "sagan.role", "sagan.stop_reason"


SWEEP_ID_TAG = "sagan.sweep_id"


# ---------------------------------------------------------------- MLflow: one parent, one child per trial


def parent_run(client, experiment_id: str, cfg: Config, sweep_id: str) -> str:
    """The sweep's parent run, made once with the search space as params and found by tag afterwards."""
    found = find_run(client, experiment_id, **{SWEEP_TAG: cfg.tune.name, ROLE_TAG: "sweep", SWEEP_ID_TAG: sweep_id})
    if found:
        client.update_run(found, status="RUNNING")  # resumed (after a Ctrl-C left it KILLED)
        return found
    tags = {
        SWEEP_TAG: cfg.tune.name,
        ROLE_TAG: "sweep",
        SWEEP_ID_TAG: sweep_id,
        "git_commit": git_commit(),
        "ray_job_id": ray_job_id(),
    }
    run = client.create_run(experiment_id, run_name=cfg.tune.name, tags={k: v for k, v in tags.items() if v})
    space = {k: v for k, v in flatten(cfg).items() if k.startswith("tune.")}
    log_params(
        client,
        run.info.run_id,
        {
            **space,
            "model.resolution": cfg.model.resolution,
            "model.ch": cfg.model.ch,
            "train.batch_size": cfg.train.batch_size,
            "scaling.num_workers": cfg.scaling.num_workers,
        },
    )
    return run.info.run_id


def mark_interrupted(client, experiment_id: str, sweep: str, parent_id: str) -> None:
    """After Ctrl-C: the parent run and every trial run still RUNNING end KILLED, as an interrupted training run
    does (a rerun of the sweep sets them RUNNING again as it resumes them)."""
    query = f"tags.`{SWEEP_TAG}` = '{sweep}' and attributes.status = 'RUNNING'"
    for run in client.search_runs([experiment_id], query):
        client.set_terminated(run.info.run_id, "KILLED")
    client.set_terminated(parent_id, "KILLED")


def child_run(client, experiment_id: str, parent_id: str, sweep: str, trial_id: str, combo: dict, cfg: Config) -> str:
    """The trial's child run (made once, linked by mlflow.parentRunId): its hyper-parameters and its whole
    training config as params, like a training run's."""
    found = find_run(client, experiment_id, **{SWEEP_TAG: sweep, TRIAL_TAG: trial_id})
    if found:
        client.update_run(found, status="RUNNING")  # the trial resumes from its checkpoint
        return found
    tags = {
        "mlflow.parentRunId": parent_id,
        SWEEP_TAG: sweep,
        TRIAL_TAG: trial_id,
        ROLE_TAG: "trial",
        "git_commit": git_commit(),
        "checkpoint_location": RunFolder.of(cfg).uri,
    }
    run = client.create_run(experiment_id, run_name=f"{sweep}/{trial_id}", tags={k: v for k, v in tags.items() if v})
    hyper = {
        "trial.lr_g": combo["lr_g"],
        "trial.lr_d": lr_d_of(combo),
        "trial.ratio": combo["ratio"],
        "trial.g_attn": combo["g_attn"],
        "trial.d_attn": combo["d_attn"],
        "trial.seed": combo["seed"],
    }
    log_params(
        client, run.info.run_id, {**hyper, **{k: v for k, v in flatten(cfg).items() if not k.startswith("tune.")}}
    )
    return run.info.run_id


# ---------------------------------------------------------------- the trial driver (a Tune function trainable)


def run_trial(params: dict, *, base: dict, tracking_uri: str, parent_id: str, sweep_dir: str) -> None:
    """Run one trial as a Ray Train run; rank 0's reports reach Tune. A failure is recorded on the child run
    (status FAILED, its reason as a tag) and raised, so Tune marks the trial ERROR and the sweep goes on."""
    bound_requests()  # a store that went away fails a request in seconds, not minutes
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(from_dict(base), params["trial"])
    cfg.run.name = f"trial-{trial_id}"  # from the trial id, never a timestamp: a restored trial resumes this run
    cfg.run.storage_path = f"{sweep_dir}/train"
    cfg.mlflow.experiment = cfg.tune.experiment
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(cfg.tune.experiment).experiment_id
    run_id = child_run(client, experiment_id, parent_id, cfg.tune.name, trial_id, params["trial"], cfg)
    try:
        raise_if_stopped(cfg)
        resume = check_resume(cfg)  # a restored trial resumes its Train run: a damaged latest falls back here too
        if resume.warning:
            print(f"warning: trial {trial_id}: {resume.warning}", file=sys.stderr)
        fit(build_trainer(cfg, tracking_uri, run_id=run_id, callbacks=[TuneReportCallback()], resume=resume), cfg)
    except (
        RunStopped,
        TrainingFailedError,
        PreflightError,
        PlacementTimeout,
    ) as e:  # not when Tune stops the trial: no failure
        reason = failure_reason(e)
        client.set_tag(run_id, REASON_TAG, reason)
        client.set_terminated(run_id, "FAILED")
        raise RuntimeError(reason) from None
    finally:  # what rank 0 kept during an outage of the store
        deliver_kept(RunFolder.of(cfg), tracking_uri, f"trial {trial_id}'s rank 0 had kept")
    try:  # not reached when ASHA stops the trial (Tune kills this actor); the report settles the status anyway
        client.set_tag(run_id, REASON_TAG, "completed")
    except Exception as e:  # noqa: BLE001 - the training succeeded; a tag must not turn it into a failure
        print(f"warning: could not tag trial {trial_id} completed: {first_line(e)}")


def failure_reason(error: Exception) -> str:
    """One line naming why a trial's training failed: the first worker's own error (Ray Train's message
    starts with a generic header line), or the controller's."""
    for attr in ("worker_failures", "controller_failure"):
        cause = getattr(error, attr, None)
        if isinstance(cause, dict) and cause:
            cause = cause[min(cause)]
        if isinstance(cause, BaseException):
            return (
                first_line(cause)
                if type(cause).__name__ == "RunStopped"
                else f"{type(cause).__name__}: {first_line(cause)}"
            )
    message = str(getattr(error, "_error_message", "") or error)  # e.g. a hang, with no worker named
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__


def trainable(cfg: Config, tracking_uri: str, parent_id: str, sweep_dir: Path):
    """The Tune trainable: `run_trial` with the sweep's fixed arguments, taking a negligible CPU share itself."""
    fn = tune.with_parameters(
        run_trial, base=to_dict(cfg), tracking_uri=tracking_uri, parent_id=parent_id, sweep_dir=str(sweep_dir)
    )
    return tune.with_resources(fn, {"CPU": DRIVER_CPU})


def trial_dirname(trial) -> str:
    """trial-<id>: the trial's folder in the sweep, readable back into its id (a failed trial may report nothing)."""
    return f"trial-{trial.trial_id}"
