"""The Ray Train TorchTrainer of a run, and the MLflow run it logs into, made by the driver; train.py and the
sweep's trials both launch through here.
"""

from pipelines.common.config import Config
from pipelines.common.provenance import git_commit, ray_job_id
from pipelines.common.run_folder import RunFolder
from pipelines.tracking.store import open_run, prepare_tracking
from sagan.config import flatten, to_dict
from sagan.storage import ray_storage


def open_tracking_run(cfg: Config, tracking_uri: str, continuing: bool | None = None) -> str:
    """The MLflow run this training run logs into, made or, when the run resumes from a checkpoint
    (`continuing`; default: Ray has a checkpoint of it), continued by the driver; its id."""
    if continuing is None:
        continuing = RunFolder.of(cfg).ray_latest() is not None
    experiment_id = prepare_tracking(tracking_uri, cfg.mlflow.experiment)
    tags = {"git_commit": git_commit(), "ray_job_id": ray_job_id()}
    return open_run(
        tracking_uri,
        experiment_id,
        cfg.run.name,
        RunFolder.of(cfg).uri,
        flatten(cfg),
        tags,
        continuing,
    )


def build_trainer(
    cfg: Config, tracking_uri: str, run_id: str | None = None, callbacks: list | None = None, resume=None
):
    """The TorchTrainer for `cfg`; fit() runs it (and resumes a run of the same name). `run_id`: the MLflow run
    rank 0 logs into (a Tune trial's child run, or train.py's), else one is opened; `callbacks`: Ray Train's;
    `resume`: the driver's ResumePlan (training.resume), whose fallback the workers load instead of a damaged latest."""
    # Ray Train loads here, not at the top: train.py and tune.py import this module before their checks, and a
    # launch they refuse costs no Ray import (benchmarks/import_times.py: ray.train.torch, seconds).
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.training.placement import startup_limits
    from pipelines.training.worker import train_loop_per_worker

    run_id = run_id or open_tracking_run(cfg, tracking_uri)
    s = cfg.scaling
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(cfg),
            "tracking_uri": tracking_uri,
            "mlflow_run_id": run_id,
            **(resume.loop_config() if resume else {}),
        },
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,  # (MIN, MAX): elastic, resized at failures and at resize checks
            use_gpu=s.use_gpu,
            placement_strategy=s.placement_strategy,
            resources_per_worker={"CPU": s.cpus_per_worker},
            elastic_resize_monitor_interval_s=s.resize_check_s,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            **ray_storage(cfg.run.storage_path),  # an S3-compatible endpoint's filesystem (AWS_ENDPOINT_URL)
            failure_config=FailureConfig(
                max_failures=cfg.run.max_failures,
                controller_failure_limit=-1 if s.elastic else startup_limits(s.placement_timeout_s)[1],
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            logging_config=LoggingConfig(log_level="WARNING"),  # Ray Train's INFO lines drown the loop's own
            callbacks=callbacks,
        ),
    )
