"""One rank's training schedule: batches in, steps, and at their intervals logging, samples, in-loop FID and
checkpoints; rank 0's MLflow logging through the Outbox.
"""

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
from PIL import Image

from pipelines.common.config import Config
from pipelines.common.run_folder import CHECKPOINT_FILE, RunFolder
from pipelines.tracking.kept import keep_safely, shown
from pipelines.training.batch_log import BatchLog
from pipelines.training.best import best_so_far, save_best
from pipelines.training.ddp import agree, param_spread
from pipelines.training.stop import stop_run
from sagan.checkpoint import save_checkpoint
from sagan.data import DataError, find_shards, with_cache
from sagan.loader import loader_workers, rank_loader, serving
from sagan.step import DivergenceGuard, LossMonitor, Trainer, unwrap
from sagan.viz import attention_figures, grid_inputs, sample_grid

# Console lines go through logging: Ray Train's patched print() would show each of them twice.
log = logging.getLogger("sagan.train")


def batch_stream(cfg: Config, rank: int, world: int, start_batch: int, device):
    """Endless (images (B, 3, R, R) in [-1, 1], labels (B,)) batches on `device`, from batch `start_batch` of
    this rank's schedule on: decoded ahead by the loader's processes, sent as uint8 (pinned on a GPU) and made
    floats on the device."""
    shards = with_cache(find_shards(cfg.data.train_shards), cfg.data)
    batches = rank_loader(
        shards,
        rank,
        world,
        cfg.train.batch_size,
        cfg.train.seed,
        start_batch,
        loader_workers(cfg, cfg.scaling.cpus_per_worker),
        cfg.data.prefetch,
        pin=device.type == "cuda",
        virtual=cfg.scaling.max_workers,
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
            from pipelines.tracking.outbox import Outbox  # here: MLflow's import is rank 0's alone (import_times.py)

            self.folder = RunFolder.of(cfg)
            self.outbox = Outbox(self.tracking_uri, self.run_id, self.folder.pending, shown=shown(self.folder))

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
        """During an outage, what waits to this node's disk now, and on object storage on into the run's prefix
        (Ray may kill this process later, and its node may go with it)."""
        if self.outbox:
            if self.outbox.persist() and self.folder.remote:
                with self.outbox.spill_lock:  # no spill appends to a file while it is moved
                    keep_safely(self.folder)

    def close(self, finished: bool) -> None:
        if self.outbox is not None:
            if finished:
                self.outbox.terminate("FINISHED")
            self.outbox.close()
            keep_safely(self.folder)  # on object storage: into the run's prefix, where the driver finds them


def _gammas(G, D) -> dict[str, float]:
    out = {}
    for net, model in (("G", unwrap(G)), ("D", unwrap(D))):
        for name, module in model.attn.items():
            out[f"gamma/{net}_block{name}"] = module.gamma.item()
    return out


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
        torch.manual_seed(cfg.train.seed + 1 + rank * 7919 + trainer.step)  # for what draws from the global generator
        self.fixed = [v.to(device) for v in grid_inputs(cfg.model.z_dim, cfg.model.num_classes, cfg.train.seed)]
        # The data is planned for scaling.num_workers' maximum of virtual ranks; this rank serves some of them.
        self.virtual = serving(rank, world, cfg.scaling.max_workers)
        self.weight = world / cfg.scaling.max_workers  # DDP's mean over the workers is then the virtual ranks' mean
        self.stream = batch_stream(cfg, rank, world, trainer.step * cfg.optim.n_dis, device)
        self.batch_log = BatchLog(rank, world)  # SAGAN_BATCH_LOG: what each step trained on
        self.window_start, self.window_steps, self.data_wait = time.perf_counter(), 0, 0.0
        # The worker group's placement group, named in the reports: a sweep's driver removes it when the trial
        # ends, should Ray's own cleaner have failed to (pipelines.sweep.tuner.ReleasePlacementGroups).
        group = ray.util.get_current_placement_group()
        self.placement_group = {"placement_group": group.id.hex()} if group is not None else {}

    def run(self) -> None:
        t, trainer = self.cfg.train, self.trainer
        if trainer.step == 0:
            eval_start = time.perf_counter()
            self.evaluate(0)  # the baseline every FID curve starts from
            self.window_start += time.perf_counter() - eval_start  # not in the first window's images/s
        start_step, run_start = trainer.step, time.perf_counter()
        while trainer.step < t.steps:
            self.monitor.update(trainer.step + 1, trainer.train_step(self.next_batches(), self.virtual, self.weight))
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
            self.batch_log.record(self.trainer.step + 1, batches)
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
            "images_per_s": t.batch_size * self.cfg.scaling.max_workers * self.cfg.optim.n_dis / step_time,
            "step_time_s": step_time,
            "data_wait_s": self.data_wait / self.window_steps,
            "data_wait_share": self.data_wait / elapsed,
            "lr_g": trainer.opt_g.param_groups[0]["lr"],
            "lr_d": trainer.opt_d.param_groups[0]["lr"],
            **_gammas(trainer.G, trainer.D),
        }
        if self.device.type == "cuda":  # the most this process's tensors held in training (see evaluate)
            values["gpu_memory_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
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
        folder = RunFolder.of(self.cfg).samples
        if folder is not None:  # also as files a person can open
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid).save(folder / f"samples_{step:06d}.png")
        for size, fig in attention_figures(G_ema, *self.fixed).items():
            self.tracker.image(fig, f"attention_{size}", step)

    def evaluate(self, step: int) -> dict:
        """In-loop FID (and IS, class accuracy) of the EMA generator on rank 0; {} elsewhere."""
        if self.evaluator is None:
            return {}
        scores = self.evaluator(self.trainer.ema.model, self.cfg.eval.loop_samples)
        if self.device.type == "cuda":  # gpu_memory_peak_gib is training's peak: Inception's batches left out
            torch.cuda.reset_peak_memory_stats(self.device)
        scores = {f"loop/{k}": v for k, v in scores.items() if k != "is_std"}
        self.tracker.metrics(scores, step)
        log.info(
            f"step {step}: in-loop FID {scores['loop/fid']:.2f} ({self.cfg.eval.loop_samples} samples)"
            + "".join(f"  {k[5:]} {v:.3f}" for k, v in scores.items() if k != "loop/fid")
        )
        if step and not self.guard.suspect and (self.best is None or scores["loop/fid"] < self.best["loop/fid"]):
            best = {"step": step, "loop/fid": scores["loop/fid"]}
            target = RunFolder.of(self.cfg).best
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
            **self.placement_group,
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
                    "world_size": self.world,  # a resumed group of another size says so (worker.resize_line)
                    "virtual_ranks": self.cfg.scaling.max_workers,  # what the data was planned for (resume.py)
                    "guard": self.guard.largest,
                    **({"best": self.best} if self.best else {}),
                }
                save_checkpoint(Path(tmp) / CHECKPOINT_FILE, self.trainer, self.cfg, extra=extra)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(report, checkpoint=ckpt)  # every rank, every time: it is a barrier
        if ckpt is not None:
            saved = ray.train.get_checkpoint()  # where Ray persisted it
            log.info(f"step {step}: checkpoint {saved.path if saved else 'saved'}")
