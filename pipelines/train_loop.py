"""The per-worker training loop that Ray Train runs on every rank (and Tune reuses per trial).

Everything Ray-specific sits at the edges: the context (rank, device), `prepare_model` for DDP, the
checkpoint to resume from, and `ray.train.report`. The step itself is `sagan.step.Trainer.train_step`.
"""

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
from PIL import Image

from sagan.checkpoint import load_checkpoint, save_checkpoint
from sagan.config import Config, flatten, from_dict
from sagan.data import batches_per_epoch, find_shards, rank_batches
from sagan.metrics import build_evaluator, feature_weights
from sagan.models import build_models
from sagan.speed import Speed, prepare_models
from sagan.step import LossMonitor, Trainer, unwrap
from sagan.viz import attention_figures, grid_inputs, metric_curve, sample_grid

# Console lines go through logging: Ray Train's patched print() would show each of them twice.
log = logging.getLogger("sagan.train")
CHECKPOINT_FILE = "checkpoint.pt"
NONFINITE_FILE = "NONFINITE.json"  # in the run directory: FailureConfig retries must not replay a diverged run


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names the step."""


def nonfinite_marker(cfg: Config) -> Path | None:
    """Where a diverged run records its step (local storage only), or None for remote storage."""
    return None if "://" in cfg.run.storage_path else Path(cfg.run.storage_path) / cfg.run.name / NONFINITE_FILE


def raise_if_diverged(cfg: Config) -> None:
    """Raise NonFiniteLossError when this run already diverged, so a retry stops instead of replaying it."""
    marker = nonfinite_marker(cfg)
    if marker and marker.is_file():
        info = json.loads(marker.read_text())
        raise NonFiniteLossError(f"non-finite loss at step {info['step']} ({info['losses']}); the last good checkpoint "
                                 f"is kept. Lower the learning rates and start a new run.name (or delete {marker})")  # fmt: skip


def batch_stream(cfg: Config, rank: int, world: int, start_batch: int, device):
    """Endless (images, labels) batches on `device`, starting `start_batch` batches into the schedule."""
    shards = find_shards(cfg.data.train_shards)
    per_epoch = batches_per_epoch(shards, world, cfg.train.batch_size)
    epoch, skip = divmod(start_batch, per_epoch)
    while True:
        for i, (x, y) in enumerate(rank_batches(shards, rank, world, cfg.train.batch_size, epoch, cfg.train.seed)):
            if i >= skip:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        epoch, skip = epoch + 1, 0


class Tracker:
    """MLflow logging from rank 0 only; a no-op elsewhere."""

    def __init__(self, enabled: bool, cfg: Config, loop_config: dict, run_id: str | None):
        self.enabled = enabled
        self.run_id = run_id
        self.tracking_uri = loop_config["tracking_uri"]
        if not enabled:
            return
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(loop_config["tracking_uri"])
        mlflow.set_experiment(cfg.mlflow.experiment)
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else cfg.run.name)
        self.run_id = run.info.run_id
        if run_id is None:  # a run given to us was set up (params, tags) by whoever made it
            mlflow.log_params(flatten(cfg))
            mlflow.set_tags({k: v for k, v in loop_config.get("tags", {}).items() if v})

    def tags(self, values: dict):
        if self.enabled:
            self.mlflow.set_tags(values)

    def checkpoint_extra(self) -> dict:
        """What a checkpoint records of the MLflow run, so evaluation can log into it."""
        return {"mlflow_run_id": self.run_id, "mlflow_tracking_uri": self.tracking_uri}

    def metrics(self, values: dict, step: int):
        if self.enabled:
            self.mlflow.log_metrics(values, step=step)

    def image(self, array: np.ndarray, key: str, step: int):
        if self.enabled:
            self.mlflow.log_image(array, key=key, step=step)

    def curve(self, metric: str, artifact: str):
        """Plot the run's whole history of `metric` (every launch of it) as an image artifact."""
        if not self.enabled:
            return
        history = self.mlflow.MlflowClient().get_metric_history(self.run_id, metric)
        # A resumed run replays the steps after its last checkpoint: the latest value of each step counts.
        latest = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
        if latest:
            self.mlflow.log_image(metric_curve(sorted(latest.items()), metric), artifact_file=artifact)

    def close(self):
        if self.enabled:
            self.mlflow.end_run()


def _gammas(G, D) -> dict[str, float]:
    out = {}
    for net, model in (("G", unwrap(G)), ("D", unwrap(D))):
        for name, module in model.attn.items():
            out[f"gamma/{net}_block{name}"] = module.gamma.item()
    return out


def param_spread(G, D) -> float:
    """Max minus min over ranks of a checksum of G's and D's weights: 0 while DDP keeps ranks in step."""
    total = sum(p.detach().double().sum() for p in [*unwrap(G).parameters(), *unwrap(D).parameters()])
    local = total.reshape(1)  # on the model's device: NCCL gathers GPU tensors only
    if not torch.distributed.is_initialized():
        return 0.0
    gathered = [torch.zeros_like(local) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, local)
    values = torch.cat(gathered)
    return float(values.max() - values.min())


def _quiet_ray_reports() -> None:
    """Silence Ray Train's INFO line per ray.train.report: Ray 2.60 names that logger by its file path, so
    RunConfig's LoggingConfig level does not reach it."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: leave its logging alone
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def prepare_eval_cache(config: dict) -> str:
    """Ray task run by the driver before training: resolve the feature extractor's weights and compute the
    real statistics into the eval cache, on the device a worker would use. Returns the weights file."""
    cfg = from_dict(config)
    torch.set_num_threads(os.cpu_count() or 1)  # alone on its node: training has not started yet
    weights = feature_weights(cfg)
    build_evaluator(cfg, "cuda" if cfg.scaling.use_gpu else "cpu", weights=weights)
    return str(weights[0])


def train_loop_per_worker(loop_config: dict) -> None:
    """Train SAGAN on this rank: `loop_config` = {"config": to_dict(cfg), "tracking_uri": ..., "tags": {...}}."""
    _quiet_ray_reports()
    cfg = from_dict(loop_config["config"])
    raise_if_diverged(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    G, D = build_models(cfg.model, seed=cfg.train.seed)  # the same initial weights on every rank
    speed = Speed.from_config(cfg.train, device)
    prepare_models(speed, G, D)  # memory layout before DDP lays out its gradient buckets
    G, D = ray.train.torch.prepare_model(G), ray.train.torch.prepare_model(D)
    trainer = Trainer(G, D, cfg, speed)

    run_id = loop_config.get("mlflow_run_id")  # a run made for us (a Tune trial's child run), else our own
    checkpoint = ray.train.get_checkpoint()
    if checkpoint and Path(checkpoint.path).name in loop_config.get("damaged", ()):  # found so by the driver
        checkpoint = ray.train.Checkpoint(loop_config["resume_from"])  # a retry's newer one from Ray is used as is
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d) / CHECKPOINT_FILE, map_location=device)
        trainer.load_state_dict(state)
        run_id = state["extra"].get("mlflow_run_id") or run_id
        if rank == 0:
            log.info(f"resumed from step {trainer.step} ({checkpoint.path})")
    if rank == 0:
        log.info(f"step settings on {device.type}: {speed}")
        if speed.compile:
            log.info("torch.compile: the first steps compile G and D (about 2.5 minutes for SAGAN-128 on an H200)")
    t = cfg.train
    # In-loop FID on rank 0, while the others wait in the next collective. The driver filled the eval cache
    # (weights, real statistics), so this loads them; built before the MLflow run starts, so a failure here
    # leaves no run behind.
    evaluator = build_evaluator(cfg, device, log=log.info) if t.eval_every and rank == 0 else None
    tracker = Tracker(rank == 0, cfg, loop_config, run_id)
    tracker.tags({f"speed.{k}": str(v) for k, v in dataclasses.asdict(speed).items()})  # what "auto" resolved to
    torch.manual_seed(cfg.train.seed + 1 + rank * 7919 + trainer.step)  # different latents per rank
    fixed_z, fixed_y = (v.to(device) for v in grid_inputs(cfg.model.z_dim, cfg.model.num_classes, cfg.train.seed))

    stream = batch_stream(cfg, rank, world, trainer.step * cfg.optim.n_dis, device)

    def evaluate(step: int) -> dict:
        if evaluator is None:
            return {}
        scores = evaluator(trainer.ema.model, cfg.eval.loop_samples)
        scores = {f"loop/{k}": v for k, v in scores.items() if k != "is_std"}
        tracker.metrics(scores, step)
        log.info(f"step {step}: in-loop FID {scores['loop/fid']:.2f} ({cfg.eval.loop_samples} samples)"
                 + "".join(f"  {k[5:]} {v:.3f}" for k, v in scores.items() if k != "loop/fid"))  # fmt: skip
        return scores

    if trainer.step == 0:
        evaluate(0)  # the baseline every FID curve starts from
    global_batch = t.batch_size * world
    start_step, window_start, window_steps = trainer.step, time.perf_counter(), 0
    run_start = window_start
    monitor = LossMonitor()
    while trainer.step < t.steps:
        monitor.update(trainer.step + 1, trainer.train_step([next(stream) for _ in range(cfg.optim.n_dis)]))
        step = trainer.step
        window_steps += 1
        log_now = step % t.log_every == 0 or step == t.steps
        ckpt_now = step % t.ckpt_every == 0 or step == t.steps
        eval_now = bool(t.eval_every) and (step % t.eval_every == 0 or step == t.steps)
        sample_now = rank == 0 and (step % t.sample_every == 0 or step == t.steps)
        if not (log_now or ckpt_now or eval_now or sample_now):
            continue  # the losses stay on the device: no wait on the GPU between log steps
        values, bad_step = monitor.read()
        if bad_step is not None:  # checked before anything is logged, sampled or saved from bad weights
            marker = nonfinite_marker(cfg)
            if marker and rank == 0:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(json.dumps({"step": bad_step, "losses": {k: str(v) for k, v in values.items()}}))
            raise NonFiniteLossError(f"non-finite loss at step {bad_step} (at step {step}: {values}); "
                                     "the last good checkpoint is kept")  # fmt: skip
        if log_now:
            elapsed = time.perf_counter() - window_start
            step_time = elapsed / window_steps
            values.update(
                images_per_s=global_batch * cfg.optim.n_dis / step_time,
                step_time_s=step_time,
                lr_g=trainer.opt_g.param_groups[0]["lr"],
                lr_d=trainer.opt_d.param_groups[0]["lr"],
                **_gammas(G, D),
            )
            tracker.metrics(values, step)
            if rank == 0:
                done = step - start_step
                eta = (time.perf_counter() - run_start) / done * (t.steps - step)
                log.info(f"step {step}/{t.steps}  d_loss {values['d_loss']:.3f}  g_loss {values['g_loss']:.3f}  "
                         f"{values['images_per_s']:.0f} img/s  eta {eta / 60:.1f} min")  # fmt: skip
            window_start, window_steps = time.perf_counter(), 0
        if sample_now:
            G_ema = trainer.ema.model
            with torch.no_grad():
                grid = sample_grid(G_ema(fixed_z, fixed_y), nrow=8)
            tracker.image(grid, "samples", step)
            if "://" not in cfg.run.storage_path:  # also as files a person can open next to the checkpoints
                folder = Path(cfg.run.storage_path) / cfg.run.name / "samples"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(grid).save(folder / f"samples_{step:06d}.png")
            for size, fig in attention_figures(G_ema, fixed_z, fixed_y).items():
                tracker.image(fig, f"attention_{size}", step)
        eval_start = time.perf_counter()
        scores = evaluate(step) if eval_now else {}
        window_start += time.perf_counter() - eval_start  # images/s measures training, not evaluation
        if log_now or ckpt_now or eval_now:
            report = {"step": step, **{k: values[k] for k in ("d_loss", "g_loss", "d_real", "d_fake")},
                      "rank_param_spread": param_spread(G, D), **scores}  # fmt: skip
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if ckpt_now and rank == 0:
                    save_checkpoint(Path(tmp) / CHECKPOINT_FILE, trainer, cfg, extra=tracker.checkpoint_extra())
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(report, checkpoint=ckpt)  # every rank, every time: it is a barrier
            if ckpt is not None:
                saved = ray.train.get_checkpoint()  # where Ray persisted it
                log.info(f"step {step}: checkpoint {saved.path if saved else 'saved'}")
    if t.eval_every:
        tracker.curve("loop/fid", "plots/loop_fid.png")
    tracker.close()
    if rank == 0:
        log.info(f"finished {t.steps} steps; MLflow run {tracker.run_id}")
