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

from pipelines.common import CHECKPOINT_FILE
from sagan.checkpoint import load_checkpoint, save_checkpoint
from sagan.config import Config, from_dict
from sagan.data import DataError, find_shards
from sagan.errors import JobFailed
from sagan.loader import loader_workers, rank_loader
from sagan.models import build_models
from sagan.speed import Speed, prepare_models
from sagan.step import DivergenceGuard, LossMonitor, Trainer, unwrap
from sagan.viz import attention_figures, grid_inputs, sample_grid

# Console lines go through logging: Ray Train's patched print() would show each of them twice.
log = logging.getLogger("sagan.train")
STOPPED_FILE = "STOPPED.json"  # in the run directory: FailureConfig retries must not replay a stopped run
BEST_DIR = "best"  # in the run directory: the checkpoint with the lowest in-loop FID so far, beside Ray's latest N


class RunStopped(JobFailed, RuntimeError):
    """The run cannot go on and a retry would not help (a non-finite loss, a divergence, a damaged shard); the
    message is one line naming the step or the file."""


def stop_marker(cfg: Config) -> Path | None:
    """Where a stopped run records why (local storage only), or None for remote storage."""
    return None if "://" in cfg.run.storage_path else Path(cfg.run.storage_path) / cfg.run.name / STOPPED_FILE


def stop_run(cfg: Config, message: str) -> RunStopped:
    """Record `message` for the retries and the driver, and return the error to raise. Every rank that stops
    writes it (the same message where they agreed), so it is there whichever rank Ray tears down first."""
    marker = stop_marker(cfg)
    if marker is not None:
        message += f". Fix the cause and start a new run.name (or delete {marker} to resume this one)"
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"message": message}))
        os.replace(tmp, marker)  # a reader never sees half a file
    return RunStopped(message)


def raise_if_stopped(cfg: Config) -> None:
    """Raise RunStopped when this run was stopped already, so a retry ends at once instead of replaying it."""
    marker = stop_marker(cfg)
    if marker and marker.is_file():
        raise RunStopped(json.loads(marker.read_text())["message"])


def batch_stream(cfg: Config, rank: int, world: int, start_batch: int, device):
    """Endless (images (B, 3, R, R) in [-1, 1], labels (B,)) batches on `device`, from batch `start_batch` of
    this rank's schedule on: decoded ahead by the loader's processes, sent as uint8 (pinned on a GPU) and made
    floats on the device."""
    shards = find_shards(cfg.data.train_shards)
    batches = rank_loader(
        shards,
        rank,
        world,
        cfg.train.batch_size,
        cfg.train.seed,
        start_batch,
        loader_workers(cfg),
        cfg.data.prefetch,
        pin=device.type == "cuda",
    )
    try:
        for x, y in batches:
            yield x.to(device, non_blocking=True).float().div_(127.5).sub_(1.0), y.to(device, non_blocking=True)
    finally:
        batches.close()  # the loader's processes end here, not whenever the garbage collector runs


class Tracker:
    """Rank 0's MLflow logging into the run the driver made, through an Outbox: never blocks the loop, and
    what the store cannot take now is delivered later. A no-op on the other ranks."""

    def __init__(self, enabled: bool, cfg: Config, loop_config: dict):
        self.run_id = loop_config["mlflow_run_id"]
        self.tracking_uri = loop_config["tracking_uri"]
        self.outbox = None
        if enabled:
            from pipelines.tracking import Outbox, pending_dir

            self.outbox = Outbox(self.tracking_uri, self.run_id, pending_dir(cfg.run.storage_path, cfg.run.name))

    def checkpoint_extra(self) -> dict:
        """What a checkpoint records of the MLflow run, so evaluation can log into it."""
        return {"mlflow_run_id": self.run_id, "mlflow_tracking_uri": self.tracking_uri}

    def tags(self, values: dict) -> None:
        if self.outbox:
            self.outbox.tags(values)

    def metrics(self, values: dict, step: int) -> None:
        if self.outbox:
            self.outbox.metrics(values, step)

    def image(self, array: np.ndarray, key: str, step: int) -> None:
        if self.outbox:
            self.outbox.image(array, key, step)

    def curve(self, metric: str, artifact_file: str) -> None:
        if self.outbox:
            self.outbox.curve(metric, artifact_file)

    def persist(self) -> None:
        if self.outbox:
            self.outbox.persist()

    def close(self, finished: bool) -> None:
        if self.outbox is not None:
            if finished:
                self.outbox.terminate("FINISHED")
            self.outbox.close()


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
    from sagan.metrics import build_evaluator, feature_weights

    cfg = from_dict(config)
    torch.set_num_threads(os.cpu_count() or 1)  # alone on its node: training has not started yet
    weights = feature_weights(cfg)
    build_evaluator(cfg, "cuda" if cfg.scaling.use_gpu else "cpu", weights=weights)
    return str(weights[0])


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
    G, D = ray.train.torch.prepare_model(G), ray.train.torch.prepare_model(D)
    trainer = Trainer(G, D, cfg, speed)
    extra = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint and Path(checkpoint.path).name in loop_config.get("damaged", ()):  # found so by the driver
        checkpoint = ray.train.Checkpoint(loop_config["resume_from"])  # a retry's newer one from Ray is used as is
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d) / CHECKPOINT_FILE, map_location=device)
        trainer.load_state_dict(state)
        extra = state["extra"]
        if rank == 0:
            log.info(f"resumed from step {trainer.step} ({checkpoint.path})")
    if rank == 0:
        log.info(f"step settings on {device.type}: {speed}")
        if speed.compile:
            log.info("torch.compile: the first steps compile G and D (about 2.5 minutes for SAGAN-128 on an H200)")
    # In-loop FID on rank 0, while the others wait in the next collective. The driver filled the eval cache
    # (weights, real statistics), so this loads them. sagan.metrics is imported only where it is used: with
    # torch-fidelity and torchvision it takes about 1 s, which the other ranks and Ray Train's controller (it
    # unpickles this function) would spend for nothing.
    evaluator = None
    if cfg.train.eval_every and rank == 0:
        from sagan.metrics import build_evaluator

        evaluator = build_evaluator(cfg, device, log=log.info)
    tracker = Tracker(rank == 0, cfg, loop_config)
    tracker.tags({f"speed.{k}": str(v) for k, v in dataclasses.asdict(speed).items()})  # what "auto" resolved to
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


class Loop:
    """One rank's training schedule: steps, and at their intervals logging, samples, in-loop FID and
    checkpoints. Every rank reports at log, checkpoint and eval steps (Ray's report is a barrier)."""

    def __init__(
        self, cfg: Config, trainer: Trainer, rank: int, world: int, device, tracker: Tracker, evaluator, extra: dict
    ):
        """`extra`: what the checkpoint resumed from recorded besides the weights ({} for a new run)."""
        self.cfg, self.trainer, self.rank, self.world, self.device = cfg, trainer, rank, world, device
        self.tracker, self.evaluator = tracker, evaluator
        self.best = best_so_far(cfg, extra.get("best"))  # {"step": ..., "loop/fid": ...} of the best checkpoint
        self.monitor = LossMonitor()
        self.guard = DivergenceGuard(cfg.train.diverge_factor, cfg.train.diverge_patience)
        self.guard.largest = dict(extra.get("guard", {}))  # the ranges seen before a resume
        torch.manual_seed(cfg.train.seed + 1 + rank * 7919 + trainer.step)  # different latents per rank
        self.fixed = [v.to(device) for v in grid_inputs(cfg.model.z_dim, cfg.model.num_classes, cfg.train.seed)]
        self.stream = batch_stream(cfg, rank, world, trainer.step * cfg.optim.n_dis, device)
        self.window_start, self.window_steps, self.data_wait = time.perf_counter(), 0, 0.0

    def run(self) -> None:
        t, trainer = self.cfg.train, self.trainer
        if trainer.step == 0:
            self.evaluate(0)  # the baseline every FID curve starts from
        start_step, run_start = trainer.step, time.perf_counter()
        while trainer.step < t.steps:
            self.monitor.update(trainer.step + 1, trainer.train_step(self.next_batches()))
            step = trainer.step
            self.window_steps += 1
            due = {
                name: bool(every) and (step % every == 0 or step == t.steps)
                for name, every in (
                    ("log", t.log_every),
                    ("ckpt", t.ckpt_every),
                    ("sample", t.sample_every),
                    ("eval", t.eval_every),
                )
            }
            if not any(due.values()):
                continue  # the losses stay on the device: no wait on the GPU between log steps
            values = self.read_losses(step)
            if due["log"]:
                self.log(step, values, (time.perf_counter() - run_start) / (step - start_step) * (t.steps - step))
            if due["sample"] and self.rank == 0:
                self.sample(step)
            eval_start = time.perf_counter()
            scores = self.evaluate(step) if due["eval"] else {}
            self.window_start += time.perf_counter() - eval_start  # images/s measures training, not evaluation
            if due["log"] or due["ckpt"] or due["eval"]:
                self.report(step, values, scores, checkpoint=due["ckpt"])
        if t.eval_every:
            self.tracker.curve("loop/fid", "plots/loop_fid.png")

    def next_batches(self) -> list:
        """optim.n_dis real batches; a damaged shard stops the run naming the file (no retry replays it)."""
        start = time.perf_counter()
        try:
            batches = [next(self.stream) for _ in range(self.cfg.optim.n_dis)]
            self.data_wait += time.perf_counter() - start  # the step waited this long for its data
            return batches
        except DataError as e:
            raise stop_run(self.cfg, f"data error at step {self.trainer.step + 1}: {e}") from None

    def read_losses(self, step: int) -> dict[str, float]:
        """The latest losses (one host sync); stops the run at a non-finite loss or a divergence, before
        anything is logged, sampled or saved from the bad weights."""
        values, bad_step = agree(*self.monitor.read(), self.device)
        if bad_step is not None:
            raise stop_run(
                self.cfg,
                f"non-finite loss at step {bad_step} (at step {step}: {values}); the last good checkpoint is kept",
            )
        diverged = self.guard.check(step, values)
        if diverged:
            raise stop_run(self.cfg, f"{diverged}; the checkpoints from before it are kept")
        return values

    def log(self, step: int, values: dict, eta_s: float) -> None:
        t, trainer = self.cfg.train, self.trainer
        elapsed = time.perf_counter() - self.window_start
        step_time = elapsed / self.window_steps
        values = {
            **values,
            "images_per_s": t.batch_size * self.world * self.cfg.optim.n_dis / step_time,
            "step_time_s": step_time,
            "data_wait_s": self.data_wait / self.window_steps,
            "data_wait_share": self.data_wait / elapsed,
            "lr_g": trainer.opt_g.param_groups[0]["lr"],
            "lr_d": trainer.opt_d.param_groups[0]["lr"],
            **_gammas(trainer.G, trainer.D),
        }
        self.tracker.metrics(values, step)
        if self.rank == 0:
            log.info(
                f"step {step}/{t.steps}  d_loss {values['d_loss']:.3f}  g_loss {values['g_loss']:.3f}  "
                f"{values['images_per_s']:.0f} img/s  data wait {values['data_wait_share']:.0%}  "
                f"eta {eta_s / 60:.1f} min"
            )
        self.window_start, self.window_steps, self.data_wait = time.perf_counter(), 0, 0.0

    def sample(self, step: int) -> None:
        """The fixed-latent grid and attention maps of the EMA generator, to MLflow and next to the checkpoints."""
        G_ema = self.trainer.ema.model
        with torch.no_grad():
            grid = sample_grid(G_ema(*self.fixed), nrow=8)
        self.tracker.image(grid, "samples", step)
        if "://" not in self.cfg.run.storage_path:  # also as files a person can open
            folder = Path(self.cfg.run.storage_path) / self.cfg.run.name / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid).save(folder / f"samples_{step:06d}.png")
        for size, fig in attention_figures(G_ema, *self.fixed).items():
            self.tracker.image(fig, f"attention_{size}", step)

    def evaluate(self, step: int) -> dict:
        """In-loop FID (and IS, class accuracy) of the EMA generator on rank 0; {} elsewhere."""
        if self.evaluator is None:
            return {}
        scores = self.evaluator(self.trainer.ema.model, self.cfg.eval.loop_samples)
        scores = {f"loop/{k}": v for k, v in scores.items() if k != "is_std"}
        self.tracker.metrics(scores, step)
        log.info(
            f"step {step}: in-loop FID {scores['loop/fid']:.2f} ({self.cfg.eval.loop_samples} samples)"
            + "".join(f"  {k[5:]} {v:.3f}" for k, v in scores.items() if k != "loop/fid")
        )
        if step and not self.guard.suspect and (self.best is None or scores["loop/fid"] < self.best["loop/fid"]):
            best = {"step": step, "loop/fid": scores["loop/fid"]}
            target = f"{self.cfg.run.storage_path}/{self.cfg.run.name}/{BEST_DIR}"
            try:
                save_best(target, self.cfg, self.trainer, {**self.tracker.checkpoint_extra(), "best": best})
                self.best = best  # only once it is on disk
                log.info(f"step {step}: best in-loop FID so far, saved to {target}")
            except Exception as e:  # noqa: BLE001 - a full disk or a storage error must not end the training
                log.warning(f"step {step}: best checkpoint not saved to {target}: {type(e).__name__}: {e}")
        return scores

    def report(self, step: int, values: dict, scores: dict, checkpoint: bool) -> None:
        """Ray's report from every rank, with rank 0's checkpoint when one is due and the run is not suspect."""
        if checkpoint and self.guard.suspect:
            checkpoint = False  # the kept checkpoints stay from before a divergence that may be starting
            if self.rank == 0:
                log.warning(
                    f"step {step}: checkpoint skipped, the losses are out of their range since step "
                    f"{self.guard.streak[0]}"
                )
        report = {
            "step": step,
            **{k: values[k] for k in ("d_loss", "g_loss", "d_real", "d_fake")},
            "rank_param_spread": param_spread(self.trainer.G, self.trainer.D),
            **scores,
        }
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if checkpoint and self.rank == 0:
                self.tracker.persist()  # during an outage: to disk now, in case Ray kills this process later
                extra = {
                    **self.tracker.checkpoint_extra(),
                    "guard": self.guard.largest,
                    **({"best": self.best} if self.best else {}),
                }
                save_checkpoint(Path(tmp) / CHECKPOINT_FILE, self.trainer, self.cfg, extra=extra)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(report, checkpoint=ckpt)  # every rank, every time: it is a barrier
        if ckpt is not None:
            saved = ray.train.get_checkpoint()  # where Ray persisted it
            log.info(f"step {step}: checkpoint {saved.path if saved else 'saved'}")


def best_so_far(cfg: Config, from_checkpoint: dict | None) -> dict | None:
    """The better of the best recorded in the checkpoint resumed from and <run dir>/best/best.json, which may be
    newer (an evaluation after that checkpoint): a resumed run must not replace a better best with a worse."""
    found = [from_checkpoint] if from_checkpoint else []
    marker = (
        None if "://" in cfg.run.storage_path else Path(cfg.run.storage_path) / cfg.run.name / BEST_DIR / "best.json"
    )
    if marker is not None and marker.is_file():
        try:
            found.append(json.loads(marker.read_text()))
        except ValueError:
            pass
    found = [b for b in found if isinstance(b, dict) and isinstance(b.get("loop/fid"), (int, float))]
    return min(found, key=lambda b: b["loop/fid"]) if found else None


def agree(values: dict[str, float], bad_step: int | None, device) -> tuple[dict[str, float], int | None]:
    """The losses averaged over ranks, and the first non-finite step on any rank: every rank then takes the
    same decision (go on, or stop), and none is left waiting in a collective for a rank that stopped."""
    if not torch.distributed.is_initialized() or not values:
        return values, bad_step
    mean = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    first_bad = torch.tensor([float("inf") if bad_step is None else bad_step], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(mean)
    torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
    mean = (mean / torch.distributed.get_world_size()).tolist()
    first = first_bad.item()
    return dict(zip(values, mean)), (None if first == float("inf") else int(first))


def save_best(target: str, cfg: Config, trainer: Trainer, extra: dict) -> None:
    """Write the best checkpoint so far to `target` (checkpoint.pt, then best.json), replacing the last one.
    Ray's retention keeps the latest run.keep_checkpoints; this one is kept beside them whatever its age."""
    info = json.dumps(extra["best"])
    if "://" not in target:
        save_checkpoint(Path(target) / CHECKPOINT_FILE, trainer, cfg, extra=extra)  # atomic: temp file + rename
        tmp = Path(target) / ".best.json.tmp"
        tmp.write_text(info)
        os.replace(tmp, Path(target) / "best.json")
        return
    import pyarrow.fs

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / CHECKPOINT_FILE, trainer, cfg, extra=extra)
        (Path(tmp) / "best.json").write_text(info)
        pyarrow.fs.copy_files(tmp, target)
