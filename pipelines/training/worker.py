"""The per-worker entry point that Ray Train runs on every rank (and Tune reuses per trial).

Everything Ray-specific sits at the edges: the context (rank, device), `prepare_model` for DDP, the
checkpoint to resume from, and `ray.train.report`. The step itself is `sagan.step.Trainer.train_step`.
"""

import dataclasses
import logging
import os
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from pipelines.common.config import from_dict
from pipelines.common.run_folder import CHECKPOINT_FILE
from pipelines.training.loop import Loop, Tracker
from pipelines.training.stop import raise_if_stopped
from sagan.checkpoint import load_checkpoint
from sagan.models import build_models
from sagan.speed import Speed, ddp_without_forward_buffer_sync, prepare_models
from sagan.step import Trainer
from sagan.storage import ray_storage

# Console lines go through logging: Ray Train's patched print() would show each of them twice.
log = logging.getLogger("sagan.train")


def _quiet_ray_reports() -> None:
    """Silence Ray Train's INFO line per ray.train.report: Ray 2.60 names that logger by its file path, so
    RunConfig's LoggingConfig level does not reach it."""
    try:  # a private module of Ray's: guarded, so another Ray layout only leaves the lines on
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: leave its logging alone
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def prepare_eval_cache(config: dict) -> str:
    """Ray task run by the driver before training: resolve the feature extractor's weights and compute the
    real statistics into the eval cache, on the device a worker would use. Returns the weights file."""
    # Here, not at the top: sagan.metrics (torch-fidelity, torchvision; benchmarks/import_times.py) is needed only in
    # this task and on rank 0, not by Ray Train's controller, which unpickles this module's loop function.
    from sagan.metrics import build_evaluator, feature_weights

    cfg = from_dict(config)
    torch.set_num_threads(os.cpu_count() or 1)  # alone on its node: training has not started yet
    weights = feature_weights(cfg)
    build_evaluator(cfg, "cuda" if cfg.scaling.use_gpu else "cpu", weights=weights)
    return str(weights[0])


def resize_line(cfg, world: int, step: int, extra: dict) -> str | None:
    """The log line of a worker group that starts at another size than the one that saved its checkpoint (when,
    from, to, why), or None."""
    before = extra.get("world_size")
    if (
        before is None
        or before == world
        or extra.get("virtual_ranks", cfg.scaling.max_workers) != cfg.scaling.max_workers
    ):
        return None  # a relaunch with another maximum: the driver warned of it (resume.check_resume)
    why = (
        "fewer workers could be placed: a worker or its node was lost, Ray Train restarted from the last checkpoint"
        if world < before
        else "more workers could be placed at a resize check"
    )
    return (
        f"resize at {time.strftime('%Y-%m-%d %H:%M:%S')}, step {step}: {before} -> {world} workers ({why}); "
        f"the data and the global batch ({cfg.train.batch_size * cfg.scaling.max_workers}) are unchanged"
    )


def train_loop_per_worker(loop_config: dict) -> None:
    """Train SAGAN on this rank. `loop_config`: {"config": to_dict(cfg), "tracking_uri": ..., "mlflow_run_id":
    the run the driver made}."""
    _quiet_ray_reports()
    cfg = from_dict(loop_config["config"])
    raise_if_stopped(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    G, D = build_models(cfg.model, seed=cfg.train.seed)  # the same initial weights on every rank
    speed = Speed.from_config(cfg.train, device)
    prepare_models(speed, G, D)  # memory layout before DDP lays out its gradient buckets
    # No buffer broadcast at each forward (one collective less per forward): every rank moves its spectral-norm
    # vectors the same way from the same weights, and only rank 0's BatchNorm statistics are saved. An elastic
    # worker also runs more forwards than another when it serves more virtual ranks, which broadcasts would hang.
    ddp = {"parallel_strategy_kwargs": ddp_without_forward_buffer_sync()}  # torch 2.13 renamed the keyword
    G, D = ray.train.torch.prepare_model(G, **ddp), ray.train.torch.prepare_model(D, **ddp)
    trainer = Trainer(G, D, cfg, speed)
    extra = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint and Path(checkpoint.path).name in loop_config.get("damaged", ()):  # found so by the driver
        where = ray_storage(loop_config["resume_from"])  # a retry's newer one from Ray is used as is
        checkpoint = ray.train.Checkpoint(where["storage_path"], filesystem=where.get("storage_filesystem"))
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d) / CHECKPOINT_FILE, map_location=device)
        trainer.load_state_dict(state)
        extra = state["extra"]
        if rank == 0:
            log.info(f"resumed from step {trainer.step} ({checkpoint.path})")
    if rank == 0:
        line = resize_line(cfg, world, trainer.step, extra)
        if line:
            log.warning(line)
        log.info(f"step settings on {device.type}: {speed}")
        if speed.compile:
            log.info("torch.compile: the first steps compile G and D (about 2.5 minutes for SAGAN-128 on an H200)")
    # In-loop FID on rank 0, while the others wait in the next collective. The driver filled the eval cache
    # (weights, real statistics), so this loads them. sagan.metrics is imported only where it is used: with
    # torch-fidelity and torchvision it takes about 1 s, which the other ranks and Ray Train's controller (it
    # unpickles this function) would spend for nothing.
    evaluator = None
    if cfg.train.eval_every and rank == 0:
        from sagan.metrics import build_evaluator  # here, not at the top: see above

        evaluator = build_evaluator(cfg, device, log=log.info)
    tracker = Tracker(rank == 0, cfg, loop_config)
    tracker.tags({f"speed.{k}": str(v) for k, v in dataclasses.asdict(speed).items()})  # what "auto" resolved to
    tracker.metrics({"world_size": world}, trainer.step)  # one point per worker-group start: its size over time
    loop = Loop(cfg, trainer, rank, world, device, tracker, evaluator, extra)
    finished = False
    try:
        loop.run()
        finished = True
    finally:
        try:
            loop.stream.close()  # the loader's processes end with the loop
        finally:
            tracker.close(finished)  # what MLflow has not taken yet goes to the run's pending file
    if rank == 0:
        log.info(f"finished {cfg.train.steps} steps; MLflow run {tracker.run_id}")
