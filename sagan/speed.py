"""How the training step runs on a device: precision, memory layout, attention kernel, compile, fused Adam.

`Speed.from_config(cfg.train, device)` resolves the config's "auto" values: on a GPU the fast path (bf16
autocast, channels_last, torch.compile, fused Adam, cuDNN autotuning), on a CPU the plain one (fp32,
eager), so CPU runs and tests behave as before. `benchmarks/train_step.py` builds `Speed` directly to measure each lever alone.
Each lever and its measured share of the gain: benchmarks/RESULTS.md.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .layers import use_sdpa


@dataclass(frozen=True)
class Speed:
    """The execution settings of a Trainer; none changes the function the step computes, only its numerics."""

    precision: str = "fp32"  # fp32, bf16 (autocast) or fp16 (autocast + loss scaling)
    channels_last: bool = False  # NHWC activations and weights: the layout tensor-core convolutions want
    compile: bool = False  # torch.compile G and D (static shapes)
    compile_backend: str = "inductor"
    compile_mode: str | None = None  # torch.compile mode; "reduce-overhead" replays CUDA graphs
    fused_adam: bool = False  # one fused kernel per optimizer step instead of a foreach loop
    sdpa: bool = True  # attention through scaled_dot_product_attention, else explicit matmul + softmax
    cudnn_benchmark: bool = False  # let cuDNN time its convolution algorithms for our (static) shapes

    @classmethod
    def from_config(cls, train_cfg, device) -> "Speed":
        """The settings `train.precision`, `train.channels_last`, `train.compile` ask for on `device`, their
        "auto" values resolved: the fast path on CUDA, fp32 eager elsewhere."""
        cuda = torch.device(device).type == "cuda"

        def auto(value):
            return cuda if value is None else bool(value)

        precision = train_cfg.precision
        if precision == "auto":
            precision = "bf16" if cuda else "fp32"
        return cls(
            precision,
            auto(train_cfg.channels_last),
            auto(train_cfg.compile),
            train_cfg.compile_backend,
            fused_adam=cuda,
            cudnn_benchmark=cuda,
        )

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def is_channels_last(model: nn.Module) -> bool:
    """True when every 4-d parameter of `model` is stored channels_last."""
    return all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)


def prepare_models(speed: Speed, *models: nn.Module) -> None:
    """Put `models` in `speed`'s memory layout and attention kernel, in place. Call it before wrapping them in
    DistributedDataParallel: DDP lays out its gradient buckets after the parameters it is given."""
    for model in models:
        if speed.channels_last:
            model.to(memory_format=torch.channels_last)
        use_sdpa(model, speed.sdpa)


def compile_model(model: nn.Module, speed: Speed) -> None:
    """torch.compile `model` in place (its state_dict keys unchanged), static shapes: the D step's batch of
    real + fake and the G step's batch of fakes compile to one graph each instead of a dynamic one."""
    model.compile(backend=speed.compile_backend, mode=speed.compile_mode, dynamic=False)


def ddp_without_forward_buffer_sync(ddp_class=None) -> dict:
    """DistributedDataParallel's keyword that turns off the buffer broadcast at each forward, in the installed
    torch: `forward_sync_buffers=False` from torch 2.13 (which deprecates the old one), `broadcast_buffers=False`
    before it (which also leaves buffers out of DDP's initial sync; every rank builds them from the same seed)."""
    import inspect

    ddp_class = ddp_class or torch.nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp_class.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
