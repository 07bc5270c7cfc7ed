"""The SAGAN training step, written once: n_dis D updates, one G update, mixed precision, EMA of G.

`Trainer` holds what a step needs between calls (optimizers, EMA, loss scalers, the step count). G and D
may be plain modules or DistributedDataParallel wrappers; the Ray loop, Tune and the benchmarks all call
`Trainer.train_step` the same way. How it runs (precision, layout, compile) is a `sagan.speed.Speed`.
The step never waits on the GPU: it returns loss tensors, and `LossMonitor` reads them back when asked.
"""

import copy
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.parametrizations import _SpectralNorm

from .checkpoint import check_fits, load_checkpoint
from .config import SaganConfig, saved_config
from .losses import hinge_d_loss, hinge_g_loss
from .models import build_models
from .speed import Speed, compile_model, is_channels_last, prepare_models

_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextmanager
def buffers_held(*models: nn.Module, held: bool = True):
    """Within the block (when `held`), forwards leave the models' buffers as they are: no spectral-norm power
    iteration, no BatchNorm running statistics (batch statistics are still used). An elastic worker's second
    and later micro-batches run so: each buffer then moves once per forward, on the first micro-batch (virtual
    rank), as it does on every worker of a run with one virtual rank per worker."""
    if not held:
        yield
        return
    saved = []
    for model in models:
        for m in unwrap(model).modules():
            if isinstance(m, _SpectralNorm) and m.training:
                saved.append((m, "training", True))
                m.training = False
            elif isinstance(m, _BatchNorm) and m.training and m.track_running_stats:
                saved.append((m, "momentum", m.momentum))
                saved.append((m.num_batches_tracked, "count", m.num_batches_tracked.clone()))
                m.momentum = 0.0  # the running statistics keep their values
    try:
        yield
    finally:
        for obj, what, value in reversed(saved):
            if what == "count":
                obj.copy_(value)
            else:
                setattr(obj, what, value)


def latent_seed(seed: int, virtual_rank: int, step: int, draw: int) -> int:
    """The seed of the latents of one draw (a D step j < n_dis, or the G step: n_dis) of step `step` of one virtual
    rank: the same whichever worker serves that rank, and distinct for every (seed, rank, step, draw)."""
    high, low = np.random.SeedSequence([seed, virtual_rank, step, draw]).generate_state(2)
    return ((int(high) << 32) | int(low)) % 2**63


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper, or `model` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _with_rest(first: torch.Tensor, rest) -> torch.Tensor:
    """`first` exactly when the other micro-batches' losses (summed in `rest`) are finite, else not finite
    (0 x inf and 0 x nan are nan): the run's check for a non-finite loss sees every virtual rank's."""
    return first + 0.0 * rest if torch.is_tensor(rest) else first


def _no_sync(model: nn.Module, skip: bool = True):
    """DDP's no_sync (gradients accumulate locally, no all-reduce) when `skip` and `model` is DDP-wrapped."""
    return model.no_sync() if skip and isinstance(model, DistributedDataParallel) else nullcontext()


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied as they are)."""

    def __init__(self, model: nn.Module, decay: float, start: int = 0):
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.decay, self.start = decay, start

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """ema = decay * ema + (1 - decay) * param, or a plain copy while step < start."""
        model = unwrap(model)
        weight = 1.0 - self.decay if step >= self.start else 1.0
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], weight)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def make_optimizers(
    G: nn.Module, D: nn.Module, cfg: SaganConfig, fused: bool = False
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """TTUR: Adam for G at optim.lr_g and for D at optim.lr_d, with optim.betas; `fused`: one kernel per step."""
    # YAML reads `[0, 0.999]` with an int 0, which newer torch's Adam rejects: force floats.
    betas = tuple(float(b) for b in cfg.optim.betas)
    impl = {"fused": True} if fused else {}  # else torch's default, the foreach implementation
    opt_g = torch.optim.Adam(unwrap(G).parameters(), lr=cfg.optim.lr_g, betas=betas, **impl)
    opt_d = torch.optim.Adam(unwrap(D).parameters(), lr=cfg.optim.lr_d, betas=betas, **impl)
    return opt_g, opt_d


_CURRENT_KEYS = ("lr", "betas", "fused", "foreach", "capturable")  # taken from the optimizer, not the checkpoint


def load_optimizer_state(opt: torch.optim.Optimizer, saved: dict, current_groups: list[dict]) -> None:
    """Load `saved` into `opt`, keeping `current_groups`' lr, betas and kernel choice, and lay each moment out
    like its parameter: fused Adam walks parameters and moments as flat arrays, so a checkpoint written with
    another memory layout (channels_last on or off) would pair each weight with another weight's moments."""
    groups = [
        {**g, **{k: cur[k] for k in _CURRENT_KEYS if k in cur}} for g, cur in zip(saved["param_groups"], current_groups)
    ]
    opt.load_state_dict({**saved, "param_groups": groups})
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p).copy_(value)


class LossMonitor:
    """Keeps the step's losses on the device and reads them back only when asked, so the loop does not wait
    on the GPU every step, yet still names the first step whose losses were not finite."""

    def __init__(self):
        self.latest: dict[str, torch.Tensor] = {}
        self._first_bad: torch.Tensor | None = None  # (): first non-finite step so far, -1 for none

    def update(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        """Record step `step`'s scalar loss tensors (device ops only, no host synchronisation)."""
        values = torch.stack([v.detach().float() for v in losses.values()])
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=values.device)
        bad = ~torch.isfinite(values).all()
        self._first_bad = torch.where(bad & (self._first_bad < 0), step, self._first_bad)
        self.latest = losses

    def read(self) -> tuple[dict[str, float], int | None]:
        """(the latest losses as floats, the first step with a non-finite loss or None): one host sync."""
        if self._first_bad is None:
            return {}, None
        values = torch.stack([v.detach().float() for v in self.latest.values()] + [self._first_bad.float()]).tolist()
        first_bad = int(values.pop())
        return dict(zip(self.latest, values)), (first_bad if first_bad >= 0 else None)


class DivergenceGuard:
    """Finite divergence: losses or D's scores far beyond the range they have kept so far.

    A reading is out of range when some |value| exceeds `factor` x the largest |value| of that quantity in
    earlier in-range readings (at least 1, so the first readings are judged too). `patience` readings out
    of range in a row are a divergence; while any are, the run is `suspect` and takes no checkpoint, so the
    checkpoints kept are from before it. factor 0 turns the guard off.
    """

    def __init__(self, factor: float, patience: int):
        self.factor, self.patience = factor, patience
        self.largest: dict[str, float] = {}
        self.streak: list[int] = []  # steps of the readings out of range in a row

    @property
    def suspect(self) -> bool:
        return bool(self.streak)

    def check(self, step: int, values: dict[str, float]) -> str | None:
        """Record the readings at `step`; a one-line description of the divergence once it is one, else None."""
        if not self.factor:
            return None
        beyond = {k: v for k, v in values.items() if abs(v) > self.factor * max(1.0, self.largest.get(k, 1.0))}
        if not beyond:
            self.streak = []
            for k, v in values.items():
                self.largest[k] = max(self.largest.get(k, 1.0), abs(v))
            return None
        self.streak.append(step)
        if len(self.streak) < self.patience:
            return None
        k, v = max(beyond.items(), key=lambda kv: abs(kv[1]) / max(1.0, self.largest.get(kv[0], 1.0)))
        return (
            f"diverged at step {self.streak[0]}: {k} = {v:.3g}, beyond {self.factor:g}x its largest earlier "
            f"|value| {max(1.0, self.largest.get(k, 1.0)):.3g}, for {len(self.streak)} readings to step {step}"
        )


class Trainer:
    """Optimizers, EMA and loss scalers around G and D; `train_step` runs one SAGAN iteration.

    `speed` (default: resolved from cfg.train for the models' device) sets precision, layout and compile.
    Plain models are put in its layout here; DDP-wrapped ones must be already (`sagan.speed.prepare_models`
    before wrapping). Compiling happens here, after the EMA copy is taken, and leaves state_dict keys as they are.
    """

    def __init__(self, G: nn.Module, D: nn.Module, cfg: SaganConfig, speed: Speed | None = None):
        self.G, self.D = G, D
        self.device = next(unwrap(G).parameters()).device
        self.speed = speed or Speed.from_config(cfg.train, self.device)
        if self.speed.channels_last and not all(is_channels_last(unwrap(m)) for m in (G, D)):
            if any(isinstance(m, DistributedDataParallel) for m in (G, D)):
                raise ValueError(
                    "channels_last: call sagan.speed.prepare_models(speed, G, D) before wrapping them in DDP"
                )
        prepare_models(self.speed, unwrap(G), unwrap(D))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = self.speed.cudnn_benchmark  # a process-wide switch
        self.z_dim, self.num_classes = cfg.model.z_dim, cfg.model.num_classes
        self.n_dis, self.seed = cfg.optim.n_dis, cfg.train.seed
        self.amp_dtype = _AUTOCAST_DTYPES[self.speed.precision]
        self.opt_g, self.opt_d = make_optimizers(G, D, cfg, fused=self.speed.fused_adam)
        self._groups = {opt: [dict(g) for g in opt.param_groups] for opt in (self.opt_g, self.opt_d)}
        self.ema = EMA(G, cfg.train.ema_decay, cfg.train.ema_start)  # before compiling: a plain copy
        if self.speed.compile:
            compile_model(unwrap(G), self.speed)
            compile_model(unwrap(D), self.speed)
        fp16 = self.speed.precision == "fp16"
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.step = 0  # G updates completed

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def sample_latents(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, z_dim) ~ N(0, I) and labels y (B,) uniform over the classes, on the trainer's device, from
        `generator` (default: torch's global one)."""
        z = torch.randn(batch_size, self.z_dim, device=self.device, generator=generator)
        y = torch.randint(0, self.num_classes, (batch_size,), device=self.device, generator=generator)
        return z, y

    def _latents(self, batch_size: int, ranks: tuple[int, ...] | None, c: int, draw: int):
        """The latents of micro-batch `c`: from virtual rank ranks[c]'s seed for this step and draw, or (no
        ranks) from torch's global generator."""
        if ranks is None:
            return self.sample_latents(batch_size)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(latent_seed(self.seed, ranks[c], self.step + 1, draw))
        return self.sample_latents(batch_size, gen)

    def _d_step(self, real, labels, ranks=None, weight: float = 1.0, j: int = 0) -> dict[str, torch.Tensor]:
        k = len(ranks) if ranks else 1
        real = real.contiguous(memory_format=self.speed.memory_format)
        self.opt_d.zero_grad(set_to_none=True)  # the G step left gradients in D
        rest = 0.0  # the other micro-batches' losses, only to pass on a non-finite one (see `_with_rest`)
        for c, (real_c, labels_c) in enumerate(zip(real.chunk(k), labels.chunk(k))):
            batch = real_c.shape[0]
            z, y_fake = self._latents(batch, ranks, c, j)
            with buffers_held(self.G, self.D, held=c > 0), _no_sync(self.D, c < k - 1):
                with torch.no_grad(), self._autocast():
                    fake = self.G(z, y_fake)
                with self._autocast():
                    # One D forward over real and fake together: two forwards before one backward break DDP's
                    # buffer broadcast (pytorch#175024), should it be turned on again; D has no BatchNorm, so the
                    # scores are the same.
                    scores = self.D(torch.cat([real_c, fake.to(real_c.dtype)]), torch.cat([labels_c, y_fake])).float()
                real_scores, fake_scores = scores[:batch], scores[batch:]
                loss = hinge_d_loss(real_scores, fake_scores)
                self.scaler_d.scale(loss * weight if weight != 1.0 else loss).backward()
            if c == 0:  # the first virtual rank's, as one rank's are logged in a run of one virtual rank per worker
                out = {
                    "d_loss": loss.detach(),
                    "d_real": real_scores.detach().mean(),
                    "d_fake": fake_scores.detach().mean(),
                }
            else:
                rest = rest + loss.detach()
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()
        out["d_loss"] = _with_rest(out["d_loss"], rest)
        return out

    def _g_step(self, batch: int, ranks=None, weight: float = 1.0) -> torch.Tensor:
        k = len(ranks) if ranks else 1
        self.opt_g.zero_grad(set_to_none=True)
        d_params = list(unwrap(self.D).parameters())
        trainable = [p.requires_grad for p in d_params]  # restored as they were: a frozen layer stays frozen
        rest = 0.0
        for c in range(k):
            z, y_fake = self._latents(batch // k, ranks, c, self.n_dis)
            # G's update needs D's input gradient only: D's weight gradients would be thrown away by the next
            # D step, so they are not computed (~6% of the step's FLOPs) and not all-reduced.
            with _no_sync(self.D), _no_sync(self.G, c < k - 1), buffers_held(self.G, self.D, held=c > 0):
                for p in d_params:
                    p.requires_grad_(False)
                try:
                    with self._autocast():
                        loss = hinge_g_loss(self.D(self.G(z, y_fake), y_fake).float())
                    self.scaler_g.scale(loss * weight if weight != 1.0 else loss).backward()
                finally:
                    for p, flag in zip(d_params, trainable):
                        p.requires_grad_(flag)
            if c == 0:
                first = loss.detach()
            else:
                rest = rest + loss.detach()
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        return _with_rest(first, rest)

    def train_step(
        self,
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        ranks: tuple[int, ...] | None = None,
        weight: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """One iteration over `optim.n_dis` real batches of (images (B, 3, R, R) in [-1, 1], labels (B,)).

        `ranks`: the virtual ranks whose batches each of `batches` holds, one after the other (an elastic worker
        serves several): each is a micro-batch with its own forward, its gradients accumulated and reduced once,
        its latents drawn from its own seed for this step (latent_seed), so a step computes the same whatever
        the world size. `weight`: world size / virtual ranks, so DDP's mean over the workers is the mean over
        the virtual ranks. None: one batch, latents from torch's global generator.

        Returns detached scalar tensors: d_loss, g_loss, d_real and d_fake (D's mean scores on the last D step,
        of the first virtual rank); reading them with .item() is left to the caller, so a GPU step does not wait.
        """
        if len(batches) != self.n_dis:
            raise ValueError(f"train_step needs optim.n_dis = {self.n_dis} real batches, got {len(batches)}")
        if self.speed.compile and self.speed.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs may be overwritten now
        for j, (real, labels) in enumerate(batches):
            metrics = self._d_step(real, labels, ranks, weight, j)
        metrics["g_loss"] = self._g_step(batches[-1][0].shape[0], ranks, weight)
        self.step += 1
        self.ema.update(self.G, self.step)
        return metrics

    def state_dict(self) -> dict:
        """Everything needed to resume: weights of G, D and G_ema, optimizer and scaler states, step."""
        return {
            "step": self.step,
            "G": unwrap(self.G).state_dict(),
            "D": unwrap(self.D).state_dict(),
            "G_ema": self.ema.model.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "scaler_g": self.scaler_g.state_dict(),
            "scaler_d": self.scaler_d.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (tensors are moved to the trainer's device); CheckpointError, one
        line, when its tensors do not fit these models."""
        for name, model in (("G", unwrap(self.G)), ("D", unwrap(self.D)), ("G_ema", self.ema.model)):
            check_fits(model, state[name], name)
        unwrap(self.G).load_state_dict(state["G"])
        unwrap(self.D).load_state_dict(state["D"])
        self.ema.model.load_state_dict(state["G_ema"])
        # Moments and step counts come from the checkpoint; lr, betas and the Adam kernel from the current
        # config and Speed, so a resumed run honours a changed optim.lr_g / lr_d / betas or device.
        load_optimizer_state(self.opt_g, state["opt_g"], self._groups[self.opt_g])
        load_optimizer_state(self.opt_d, state["opt_d"], self._groups[self.opt_d])
        if state["scaler_g"]:
            self.scaler_g.load_state_dict(state["scaler_g"])
        if state["scaler_d"]:
            self.scaler_d.load_state_dict(state["scaler_d"])
        self.step = int(state["step"])


def trainer_from_checkpoint(path: str | Path, device="cpu") -> tuple[Trainer, SaganConfig]:
    """A Trainer rebuilt from the checkpoint's own config with every state restored, and that config."""
    state = load_checkpoint(path, map_location=device)
    cfg = saved_config(state["config"])
    G, D = build_models(cfg.model)
    trainer = Trainer(G.to(device), D.to(device), cfg)
    trainer.load_state_dict(state)
    return trainer, cfg
