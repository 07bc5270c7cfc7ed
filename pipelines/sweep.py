"""The Tune side of a sweep: its search space, the trial driver that runs one training run per trial, and
the MLflow runs (one parent per sweep, one child per trial, found again by tags so a resumed sweep adds none).

A trial is a training run: the driver builds the same TorchTrainer as pipelines/train.py (`build_trainer`)
with the trial's hyper-parameters, named after the trial id so that a restored sweep resumes it from its
checkpoint, and forwards rank 0's reports to Tune (TuneReportCallback) for ASHA.
"""

import itertools
import json
import sys
import uuid
from pathlib import Path

from pipelines.common import first_line, git_commit, ray_job_id
from pipelines.tracking import bound_requests, deliver_pending, find_run, log_params, pending_dir
from sagan.config import TUNE_METRICS, Config, ConfigError, flatten, from_dict, to_dict, with_overrides
from sagan.errors import UserError

SWEEP_TAG, TRIAL_TAG, ROLE_TAG, REASON_TAG = "sagan.sweep", "sagan.trial_id", "sagan.role", "sagan.stop_reason"
SWEEP_ID_TAG = "sagan.sweep_id"
SPACE_FILE = "sweep.json"  # in the sweep's folder: its config and id; a rerun must not silently change them
DRIVER_CPU = 0.01  # what a trial's driver function reserves; its Train workers reserve their own


class SweepError(UserError, ValueError):
    """A search space that cannot run; the message names the key and the fix."""


def placements(cfg: Config) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(G sizes, D sizes) per placement: tune.attn tied, else tune.g_attn x tune.d_attn (a side left null keeps
    the model's own placement), else the model's own placement alone."""
    t = cfg.tune
    if t.attn is not None:
        return [(tuple(a), tuple(a)) for a in t.attn]
    g = t.g_attn if t.g_attn is not None else (tuple(cfg.model.g_attn),)
    d = t.d_attn if t.d_attn is not None else (tuple(cfg.model.d_attn),)
    return [(tuple(a), tuple(b)) for a, b in itertools.product(g, d)]


def lr_d_of(combo: dict) -> float:
    """lr_g x ratio without float noise (1e-4 x 3 is 3.0000000000000004e-05)."""
    return float(f"{combo['lr_g'] * combo['ratio']:.10g}")


def combinations(cfg: Config) -> list[dict]:
    """Every trial setting of the search space: {"lr_g", "ratio", "g_attn", "d_attn", "seed"}."""
    t = cfg.tune
    return [
        {"lr_g": lr, "ratio": ratio, "g_attn": list(g), "d_attn": list(d), "seed": seed}
        for lr, ratio, (g, d), seed in itertools.product(t.lr_g, t.ratio, placements(cfg), t.seeds)
    ]


def trial_config(base: Config, combo: dict) -> Config:
    """The training config of one trial: `base` with the combination's values and tune.steps steps."""
    return with_overrides(
        base,
        [
            f"optim.lr_g={combo['lr_g']}",
            f"optim.lr_d={lr_d_of(combo)}",
            f"model.g_attn={combo['g_attn']}",
            f"model.d_attn={combo['d_attn']}",
            f"train.seed={combo['seed']}",
            f"train.steps={base.tune.steps}",
        ],
    )


def check_sweep(cfg: Config) -> list[dict]:
    """The combinations of cfg's search space, or SweepError for one that cannot run (checked before any trial)."""
    t = cfg.tune
    if t.attn is not None and (t.g_attn is not None or t.d_attn is not None):
        raise SweepError(
            "tune.attn (tied placements) and tune.g_attn / tune.d_attn (crossed) are both set; "
            "set tune.attn=null to cross G's and D's placements, or drop g_attn / d_attn"
        )
    for key in ("lr_g", "ratio", "seeds"):
        if not getattr(t, key):
            raise SweepError(f"tune.{key} is empty: the search space has no trial; give it at least one value")
    if not placements(cfg):
        raise SweepError(
            "tune.attn (or tune.g_attn / tune.d_attn) is empty: the search space has no trial; "
            "[[]] is one placement without attention"
        )
    combos = combinations(cfg)
    for combo in combos:
        try:
            trial_config(cfg, combo)
        except ConfigError as e:
            raise SweepError(f"tune: the trial {combo} is not a valid training config: {e}") from None
    if not cfg.train.eval_every:
        raise SweepError(
            f"tune.metric {t.metric} is reported only with in-loop evaluation; set train.eval_every "
            f"to a few steps (at most tune.grace_period = {t.grace_period})"
        )
    if t.metric == "loop/class_acc" and cfg.eval.feature_extractor != "sample-classifier":
        raise SweepError("tune.metric loop/class_acc is reported only with eval.feature_extractor=sample-classifier")
    if t.grace_period >= t.steps:
        raise SweepError(
            f"tune.grace_period ({t.grace_period}) must be below tune.steps ({t.steps}) for ASHA to stop anything"
        )
    if cfg.train.eval_every > t.grace_period:
        raise SweepError(
            f"train.eval_every ({cfg.train.eval_every}) exceeds tune.grace_period ({t.grace_period}): ASHA "
            "would have no metric to compare at its first rung; lower train.eval_every"
        )
    return combos


def check_same_sweep(sweep_dir: Path, combos: list[dict], cfg: Config, restorable: bool) -> str:
    """Record the sweep (its whole config and combinations, and a new sweep id) in its folder. When Tune has
    state to restore, SweepError if anything changed: the restored trials would mix old and new settings.
    Returns the sweep id, which tags the MLflow parent: a sweep started afresh gets a parent of its own."""
    record = {"config": to_dict(cfg), "combinations": combos}
    path = sweep_dir / SPACE_FILE
    if path.is_file() and restorable:
        saved = json.loads(path.read_text())
        # How the data is checked changes no trial's result (and sweeps recorded before the key lack it).
        saved.get("config", {}).get("data", {})["verify"] = cfg.data.verify
        if {k: saved.get(k) for k in record} != json.loads(json.dumps(record)):
            old, new = flatten(saved.get("config", {})), flatten(json.loads(json.dumps(record["config"])))
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)) or ["tune combinations"]
            more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            raise SweepError(
                f"sweep {cfg.tune.name} exists ({sweep_dir}) with other settings ({', '.join(changed[:5])}"
                f"{more}; relative paths count from the directory you run in); rerun it unchanged to "
                "resume it, or choose another tune.name"
            )
        return saved["sweep_id"]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    record["sweep_id"] = uuid.uuid4().hex
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return record["sweep_id"]


def concurrency(cfg: Config, cluster: dict) -> int:
    """tune.max_concurrent_trials, or how many trials the cluster holds at once: GPUs // GPUs per trial, or
    CPUs // CPUs per trial (Tune does not count the Train workers a trial starts, so this is the throttle)."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    s = cfg.scaling
    by_cpu = int(cluster.get("CPU", 0) // (s.num_workers * s.cpus_per_worker + DRIVER_CPU))
    by_gpu = int(cluster.get("GPU", 0) // s.num_workers) if s.use_gpu else by_cpu
    return max(1, min(by_cpu, by_gpu))


# ---------------------------------------------------------------- MLflow: one parent, one child per trial


def parent_run(client, experiment_id: str, cfg: Config, sweep_id: str) -> str:
    """The sweep's parent run, made once with the search space as params and found by tag afterwards."""
    found = find_run(client, experiment_id, **{SWEEP_TAG: cfg.tune.name, ROLE_TAG: "sweep", SWEEP_ID_TAG: sweep_id})
    if found:
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


def child_run(client, experiment_id: str, parent_id: str, sweep: str, trial_id: str, combo: dict, cfg: Config) -> str:
    """The trial's child run (made once, linked by mlflow.parentRunId): its hyper-parameters and its whole
    training config as params, like a training run's."""
    found = find_run(client, experiment_id, **{SWEEP_TAG: sweep, TRIAL_TAG: trial_id})
    if found:
        return found
    tags = {
        "mlflow.parentRunId": parent_id,
        SWEEP_TAG: sweep,
        TRIAL_TAG: trial_id,
        ROLE_TAG: "trial",
        "git_commit": git_commit(),
        "checkpoint_location": f"{cfg.run.storage_path}/{cfg.run.name}",
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
    import mlflow
    from ray import tune
    from ray.train import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.launch import PreflightError, build_trainer
    from pipelines.resume import check_resume
    from pipelines.train_loop import RunStopped, raise_if_stopped

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
        build_trainer(cfg, tracking_uri, run_id=run_id, callbacks=[TuneReportCallback()], resume=resume).fit()
    except (RunStopped, TrainingFailedError, PreflightError) as e:  # not when Tune stops the trial: no failure
        reason = failure_reason(e)
        client.set_tag(run_id, REASON_TAG, reason)
        client.set_terminated(run_id, "FAILED")
        raise RuntimeError(reason) from None
    finally:  # what rank 0 kept during an outage of the store
        deliver_pending(
            pending_dir(cfg.run.storage_path, cfg.run.name), tracking_uri, f"trial {trial_id}'s rank 0 had kept"
        )
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
    from ray import tune

    fn = tune.with_parameters(
        run_trial, base=to_dict(cfg), tracking_uri=tracking_uri, parent_id=parent_id, sweep_dir=str(sweep_dir)
    )
    return tune.with_resources(fn, {"CPU": DRIVER_CPU})


def param_space(cfg: Config, combos: list[dict]) -> dict:
    """Tune's param_space: the combinations as one grid (or one choice, for random search)."""
    from ray import tune

    return {"trial": tune.grid_search(combos) if cfg.tune.search == "grid" else tune.choice(combos)}


def metric_mode(cfg: Config) -> str:
    return TUNE_METRICS[cfg.tune.metric]


def trial_dirname(trial) -> str:
    """trial-<id>: the trial's folder in the sweep, readable back into its id (a failed trial may report nothing)."""
    return f"trial-{trial.trial_id}"
