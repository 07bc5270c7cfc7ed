"""The SAGAN training step, written once: n_dis D updates, one G update, mixed precision, EMA of G.

`Trainer` holds what a step needs between calls (optimizers, EMA, loss scalers, the step count). G and D
may be plain modules or DistributedDataParallel wrappers; the Ray loop, Tune and the benchmarks all call
`Trainer.train_step` the same way.
"""

import copy
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import Config
from .losses import hinge_d_loss, hinge_g_loss

_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper, or `model` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


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


def make_optimizers(G: nn.Module, D: nn.Module, cfg: Config) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """TTUR: Adam for G at optim.lr_g and for D at optim.lr_d, with optim.betas."""
    # YAML reads `[0, 0.999]` with an int 0, which newer torch's Adam rejects: force floats.
    betas = tuple(float(b) for b in cfg.optim.betas)
    opt_g = torch.optim.Adam(unwrap(G).parameters(), lr=cfg.optim.lr_g, betas=betas)
    opt_d = torch.optim.Adam(unwrap(D).parameters(), lr=cfg.optim.lr_d, betas=betas)
    return opt_g, opt_d


class Trainer:
    """Optimizers, EMA and loss scalers around G and D; `train_step` runs one SAGAN iteration."""

    def __init__(self, G: nn.Module, D: nn.Module, cfg: Config):
        self.G, self.D = G, D
        self.device = next(unwrap(G).parameters()).device
        self.z_dim, self.num_classes = cfg.model.z_dim, cfg.model.num_classes
        self.n_dis = cfg.optim.n_dis
        self.amp_dtype = _AUTOCAST_DTYPES[cfg.train.precision]
        self.opt_g, self.opt_d = make_optimizers(G, D, cfg)
        self._hyper = [(opt, dict(group)) for opt in (self.opt_g, self.opt_d) for group in opt.param_groups]
        self.ema = EMA(G, cfg.train.ema_decay, cfg.train.ema_start)
        fp16 = cfg.train.precision == "fp16"
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.step = 0  # G updates completed

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def sample_latents(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, z_dim) ~ N(0, I) and labels y (B,) uniform over the classes, on the trainer's device."""
        z = torch.randn(batch_size, self.z_dim, device=self.device)
        y = torch.randint(0, self.num_classes, (batch_size,), device=self.device)
        return z, y

    def _d_step(self, real: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = real.shape[0]
        self.opt_d.zero_grad(set_to_none=True)  # the G step left gradients in D
        z, y_fake = self.sample_latents(batch)
        with torch.no_grad(), self._autocast():
            fake = self.G(z, y_fake)
        with self._autocast():
            # One D forward over real and fake together: two forwards before one backward break DDP's
            # buffer broadcast (pytorch#175024); D has no BatchNorm, so the scores are the same.
            scores = self.D(torch.cat([real, fake.to(real.dtype)]), torch.cat([labels, y_fake])).float()
        real_scores, fake_scores = scores[:batch], scores[batch:]
        loss = hinge_d_loss(real_scores, fake_scores)
        self.scaler_d.scale(loss).backward()
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()
        return {"d_loss": loss.detach(), "d_real": real_scores.detach().mean(), "d_fake": fake_scores.detach().mean()}

    def _g_step(self, batch: int) -> torch.Tensor:
        self.opt_g.zero_grad(set_to_none=True)
        z, y_fake = self.sample_latents(batch)
        # D's gradients from this backward are thrown away by the next D step: skip their all-reduce.
        no_sync = self.D.no_sync() if isinstance(self.D, DistributedDataParallel) else nullcontext()
        with no_sync:
            with self._autocast():
                loss = hinge_g_loss(self.D(self.G(z, y_fake), y_fake).float())
            self.scaler_g.scale(loss).backward()
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        return loss.detach()

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One iteration over `optim.n_dis` real batches of (images (B, 3, R, R) in [-1, 1], labels (B,)).

        Returns detached scalar tensors: d_loss, g_loss, d_real and d_fake (D's mean scores on the last
        D step); reading them with .item() is left to the caller, so a GPU step does not wait on them.
        """
        if len(batches) != self.n_dis:
            raise ValueError(f"train_step needs optim.n_dis = {self.n_dis} real batches, got {len(batches)}")
        for real, labels in batches:
            metrics = self._d_step(real, labels)
        metrics["g_loss"] = self._g_step(batches[-1][0].shape[0])
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
        """Restore what `state_dict` returned (tensors are moved to the trainer's device)."""
        unwrap(self.G).load_state_dict(state["G"])
        unwrap(self.D).load_state_dict(state["D"])
        self.ema.model.load_state_dict(state["G_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        # Moments and step counts come from the checkpoint; lr and betas from the current config, so a
        # resumed run honours a changed optim.lr_g / lr_d / betas.
        for opt, hyper in self._hyper:
            for group in opt.param_groups:
                group.update(lr=hyper["lr"], betas=hyper["betas"])
        if state["scaler_g"]:
            self.scaler_g.load_state_dict(state["scaler_g"])
        if state["scaler_d"]:
            self.scaler_d.load_state_dict(state["scaler_d"])
        self.step = int(state["step"])
