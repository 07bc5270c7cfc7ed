"""The model library's configuration: the model, optim, train, data and eval sections, every key with its type,
its default and what it means. The pipelines add their own sections (pipelines.common.config).

Defaults are the demo setting (32x32 digits on a laptop); `configs/*.yaml` override only what differs.
`load_config(path, ["optim.lr_d=4e-4", "model.g_attn=[32,64]"])` reads YAML, applies dotted overrides,
and rejects unknown keys and wrong types with an error naming the key.

Each section is a pydantic model: the type and range of a key are declared on it, and the docstring under it
is its documentation, and its description in configs/schema.json. Checks across keys are the validators of
`SaganConfig`. How YAML and overrides are read, and how a refusal is worded, is sagan/config_loading.py.
"""

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BeforeValidator, Field, model_validator

from .config_loading import (
    PAIR,
    AutoBool,
    ConfigModel,
    Ints,
    NonNegative,
    OffOrAboveOne,
    Positive,
    PositiveFinite,
    Rule,
    Str,
    Unit,
    build,
    cross_field,
    load_into,
    merge,
    parse_overrides,
    plain,
)
from .config_loading import ConfigError as ConfigError  # re-exported: what every function here raises
from .models import attention_channels, check_attn_resolutions, d_block_resolutions, g_block_resolutions

INCEPTION = "inception-v3-compat"  # torch-fidelity's TF-ported Inception v3: the standard FID/IS network
SAMPLE_CLASSIFIER = "sample-classifier"  # a small CNN trained on the built-in sample set (offline)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DATA_VERIFY = ("full", "size", "off")


def _off_is_a_word(value):
    return "off" if value is False else value  # YAML 1.1 reads an unquoted `off` as false


IsSamples = Annotated[int, Field(ge=10), Rule("must be at least 10 (IS uses 10 splits)")]


class ModelConfig(ConfigModel):
    """The generator and discriminator (sagan/models.py)."""

    resolution: Literal[32, 64, 128] = 32
    """image size: 32, 64 or 128"""
    ch: Positive = 16
    """width multiplier; the paper uses 64 at 128px"""
    z_dim: Positive = 128
    """latent size (SAGAN paper: 128)"""
    num_classes: Positive = 10
    """must match the data's manifest"""
    g_attn: Ints = (16,)
    """G feature-map sizes followed by self-attention; [] for none"""
    d_attn: Ints = (16,)
    """D feature-map sizes followed by self-attention; [] for none"""
    g_sn: bool = True
    """spectral norm on every conv/linear of G (not its class-conditional BN tables)"""
    d_sn: bool = True
    """spectral norm on every conv/linear and the projection embedding of D"""


class OptimConfig(ConfigModel):
    """Adam for G and D."""

    lr_g: PositiveFinite = 1e-4
    """SAGAN paper, Sec. 5 (TTUR): lr_G = 1e-4"""
    lr_d: PositiveFinite = 4e-4
    """SAGAN paper, Sec. 5 (TTUR): lr_D = 4e-4"""
    betas: Annotated[tuple[Unit, Unit], PAIR] = (0.0, 0.999)
    """released code; the paper states (0, 0.9)"""
    n_dis: Positive = 1
    """D updates per G update (SAGAN: 1)"""


class TrainConfig(ConfigModel):
    """The training loop (pipelines/training/loop.py) and how its step runs (sagan/step.py, sagan/speed.py)."""

    steps: Positive = 1000
    """G updates in total"""
    batch_size: Positive = 32
    """per worker: the global batch is batch_size x scaling.num_workers (its MAX when elastic)"""
    precision: Literal[PRECISIONS] = "auto"
    """auto (bf16 on GPUs, fp32 on CPUs), fp32, bf16 (autocast) or fp16 (autocast + loss scaling)"""
    channels_last: AutoBool = None
    """NHWC layout for G and D; null (or auto): on for GPUs, off on CPUs"""
    compile: AutoBool = None
    """torch.compile G and D (the first steps take minutes); null (or auto): on for GPUs, off on CPUs"""
    compile_backend: Str = "inductor"
    """torch.compile backend; "aot_eager" needs no compiler toolchain (debugging)"""
    seed: int = 0
    """G's and D's initial weights (the same on every rank), the order of the data and the latents"""
    ema_decay: Unit = 0.99
    """EMA of G's weights for sampling; BigGAN uses 0.9999 at ImageNet scale"""
    ema_start: NonNegative = 0
    """before this step the EMA copies G instead of averaging"""
    log_every: Positive = 25
    """steps between metric lines / MLflow points"""
    sample_every: Positive = 250
    """steps between sample grids and attention maps"""
    ckpt_every: Positive = 250
    """steps between checkpoints"""
    eval_every: NonNegative = 0
    """steps between in-loop FID evaluations; 0 turns them off"""
    diverge_factor: OffOrAboveOne = 100.0
    """Divergence guard: stop when a loss or D's mean score exceeds diverge_factor x its largest earlier |value|
    (at least 1) in diverge_patience readings in a row (log, sample, checkpoint and eval steps); 0: off."""
    diverge_patience: Positive = 3
    """readings in a row out of range before the divergence guard stops the run (see diverge_factor)"""


class DataConfig(ConfigModel):
    """The image shards (preprocessing/shard_imagenet.py writes them) and their loader."""

    train_shards: Str = "data/sample/shards/train"
    """shard directory, brace pattern or manifest.json"""
    val_shards: Str = "data/sample/shards/val"
    """the same, for the real statistics of FID"""
    verify: Annotated[Literal[DATA_VERIFY], BeforeValidator(_off_is_a_word)] = "full"
    """before training: full (sizes, then sha256 in Ray tasks), size (stat only) or off"""
    loader_workers: Annotated[int, Field(ge=0), Rule("must be 0 or more (or null for the rank's CPUs)")] | None = None
    """decoding processes per rank; null: the rank's CPUs (scaling.cpus_per_worker, at least 1); 0: in the training process"""
    prefetch: Annotated[int, Field(ge=1)] = 4
    """batches each loader process decodes ahead"""
    cache_dir: Str | None = None
    """shards on object storage: a local folder for whole-shard copies, shared by a node's loaders; null: memory"""
    cache_gb: PositiveFinite = 50.0
    """the most data.cache_dir holds, least recently used shards removed first"""


class EvalConfig(ConfigModel):
    """FID and Inception Score: in the loop (train.eval_every) and in pipelines/evaluate.py."""

    num_samples: IsSamples = 50000
    """generated images per FID/IS in pipelines/evaluate.py (the standard protocol: 50k)"""
    loop_samples: IsSamples = 5000
    """generated images per in-loop FID (every train.eval_every steps): faster, noisier"""
    feature_extractor: Literal[INCEPTION, SAMPLE_CLASSIFIER] = INCEPTION
    """or "sample-classifier" for the built-in digits (trained on their train split)"""
    inception_weights: Str | None = None
    """local weights-inception-2015-12-05-6726825d.pth, for clusters offline"""
    real_split: Literal["val", "train"] = "val"
    """real statistics from data.val_shards ("val") or data.train_shards ("train")"""
    batch_size: Positive = 250
    """images per generator and feature-extractor batch"""
    cache_dir: Str | None = None
    """real statistics, sample classifier: a folder or s3://... (mirrored on each node); default <shards root>/cache
    or ~/.cache/sagan"""
    seed: int = 0
    """latents and labels of the scored samples: the same on every evaluation"""


class SaganConfig(ConfigModel):
    """The model library's sections: what sagan/ reads. The pipelines add Ray's, MLflow's and the sweep's
    (pipelines.common.config.Config); configs/*.yaml set what differs from the defaults."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _consistent(self):
        """Checks across keys of the model and train sections (each key's own range is on its field)."""
        _check_attention(self.model)
        _check_compile_backend(self.train)
        return self


def _check_attention(m: ModelConfig) -> None:
    """Attention only after blocks the networks have, and at a width its query/key projections can divide."""
    for key, attn, sizes in (
        ("model.g_attn", m.g_attn, g_block_resolutions(m.resolution)),
        ("model.d_attn", m.d_attn, d_block_resolutions(m.resolution)),
    ):
        try:
            check_attn_resolutions(key, attn, sizes)
        except ValueError as e:
            raise cross_field(key, str(e)) from None
    for where, channels in attention_channels(m.resolution, m.ch, m.g_attn, m.d_attn).items():
        if channels % 8:  # queries and keys have channels / 8 (SAGAN paper, Sec. 3: C-bar = C/8)
            message = f"model.ch: attention at {where} would have {channels} channels; it needs a multiple of 8"
            raise cross_field("model.ch", message)


def _check_compile_backend(t: TrainConfig) -> None:
    """A backend torch.compile knows, when it may compile (imports torch._dynamo only then: seconds)."""
    if t.compile is not False and t.compile_backend != "inductor":
        from torch._dynamo import list_backends

        backends = list_backends(exclude_tags=())
        if t.compile_backend not in backends:
            message = (
                f"train.compile_backend: '{t.compile_backend}' is not a torch.compile backend; "
                f"use one of {', '.join(backends)}"
            )
            raise cross_field("train.compile_backend", message)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, root=SaganConfig):
    """The validated `root` config from its defaults, then the YAML file at `path` (if any), then `overrides`. The
    pipelines' files carry more sections: pipelines.common.config.load_config reads those."""
    return load_into(root, path, overrides)


def with_overrides(cfg: SaganConfig, overrides: list[str]) -> SaganConfig:
    """A validated copy of `cfg` (of any config class) with dotted `key=value` overrides applied."""
    return build(type(cfg), merge(to_dict(cfg), parse_overrides(overrides)))


def validate(cfg: SaganConfig) -> SaganConfig:
    """`cfg` itself when its values are consistent (after assignments, which are not checked); ConfigError
    naming the key otherwise."""
    build(type(cfg), to_dict(cfg))
    return cfg


def to_dict(cfg: SaganConfig) -> dict:
    """The config as nested plain dicts (tuples become lists), ready for YAML or a checkpoint."""
    return plain(cfg.model_dump())


def from_dict(data: dict, root=SaganConfig) -> SaganConfig:
    """The validated `root` config that `to_dict` produced."""
    return build(root, data)


def saved_config(data: dict) -> SaganConfig:
    """The library's sections of a saved config (a checkpoint's holds the pipelines' sections too, which are
    theirs to read)."""
    return build(SaganConfig, {k: v for k, v in data.items() if k in SaganConfig.model_fields})


def flatten(cfg: SaganConfig | dict) -> dict[str, object]:
    """{"model.ch": 16, ...}: one entry per leaf key, as MLflow params want them (of a Config or of to_dict's output)."""
    tree = cfg if isinstance(cfg, dict) else to_dict(cfg)
    return {f"{section}.{k}": v for section, keys in tree.items() for k, v in keys.items()}


def dump_yaml(cfg: SaganConfig) -> str:
    """The whole resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
