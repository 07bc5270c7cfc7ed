"""The configuration tree: every key, its type, its default and what it means, in one place.

Defaults are the demo setting (32x32 digits on a laptop); `configs/*.yaml` override only what differs.
`load_config(path, ["optim.lr_d=4e-4", "model.g_attn=[32,64]"])` reads YAML, applies dotted overrides,
and rejects unknown keys and wrong types with an error naming the key.

Each section is a pydantic model: the type and range of a key are declared on it, and the docstring under it
is its documentation, and its description in configs/schema.json (for editors; `python -m sagan.config
--schema > configs/schema.json` regenerates it, and tests/test_config.py checks that it is current). Checks
across keys are the validators of `Config`. How YAML and overrides are read, and how a refusal is worded, is
sagan/config_loading.py.
"""

import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BeforeValidator, Field, model_validator

from .config_loading import (
    PAIR,
    TUPLE,
    YAML_FLOAT,
    AutoBool,
    ConfigError,
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
    number_as_text,
    parse_overrides,
    plain,
)

__all__ = [
    "DATA_VERIFY",
    "INCEPTION",
    "PLACEMENT_STRATEGIES",
    "SAMPLE_CLASSIFIER",
    "TUNE_METRICS",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "MlflowConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScalingConfig",
    "TrainConfig",
    "TuneConfig",
    "dump_yaml",
    "flatten",
    "from_dict",
    "json_schema",
    "load_config",
    "parse_overrides",
    "schema_text",
    "to_dict",
    "validate",
    "with_overrides",
]

INCEPTION = "inception-v3-compat"  # torch-fidelity's TF-ported Inception v3: the standard FID/IS network
SAMPLE_CLASSIFIER = "sample-classifier"  # a small CNN trained on the built-in sample set (offline)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DATA_VERIFY = ("full", "size", "off")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement groups
TUNE_METRICS = {"loop/fid": "min", "loop/is": "max", "loop/class_acc": "max"}  # in-loop metric -> better when

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "configs" / "schema.json"
SCHEMA_COMMAND = "python -m sagan.config --schema > configs/schema.json"


def _off_is_a_word(value):
    return "off" if value is False else value  # YAML 1.1 reads an unquoted `off` as false


IsSamples = Annotated[int, Field(ge=10), Rule("must be at least 10 (IS uses 10 splits)")]
Placements = Annotated[tuple[Ints, ...], TUPLE]


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
    """The training loop (pipelines/train_loop.py) and how its step runs (sagan/step.py, sagan/speed.py)."""

    steps: Positive = 1000
    """G updates in total"""
    batch_size: Positive = 32
    """per worker: the global batch is batch_size x scaling.num_workers"""
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
    """real statistics, sample classifier; default <shards root>/cache or ~/.cache/sagan"""
    seed: int = 0
    """latents and labels of the scored samples: the same on every evaluation"""


# --- Ray, MLflow and Tune: the sections of the pipelines/ package (nothing in sagan/ reads them) ---


class ScalingConfig(ConfigModel):
    """Ray Train's workers."""

    num_workers: Positive = 2
    """Ray Train workers, one per GPU when use_gpu"""
    use_gpu: bool = False
    """one GPU per worker"""
    cpus_per_worker: PositiveFinite = 0.5
    """fractional CPUs leave Ray Data a budget on small machines"""
    placement_strategy: Literal[PLACEMENT_STRATEGIES] = "PACK"
    """Ray's: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD (one worker per node)"""


class RunConfig(ConfigModel):
    """The run: its name, storage and fault tolerance."""

    name: Str = "sagan-demo"
    """a run restarted with the same name resumes from its last checkpoint"""
    storage_path: Str = "runs"
    """checkpoints and results; shared storage (S3, GCS, NFS) on multi-node"""
    max_failures: NonNegative = 2
    """worker failures tolerated before the run fails"""
    keep_checkpoints: Positive = 2
    """most recent checkpoints kept"""


class MlflowConfig(ConfigModel):
    """Where runs are tracked."""

    tracking_uri: Str | None = None
    """default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db"""
    experiment: Str = "sagan-train"
    """MLflow experiment of training runs"""


class TuneConfig(ConfigModel):
    """pipelines/tune.py: the study of SAGAN's Table 1 (attention placement) x Sec. 4 (TTUR ratio) as one sweep."""

    name: Annotated[
        str,
        Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"),
        BeforeValidator(number_as_text),
        Rule("{input} must be letters, digits, '.', '_' or '-' (it names a folder and MLflow tags)"),
    ] = "sagan-tune-demo"
    """the sweep: its folder under run.storage_path, its MLflow parent; rerun to resume"""
    experiment: Str = "sagan-tune"
    """MLflow experiment holding the parent run and one child run per trial"""
    lr_g: Annotated[tuple[PositiveFinite, ...], TUPLE] = (1e-4,)
    """G learning rates (one value: fixed)"""
    ratio: Annotated[tuple[PositiveFinite, ...], TUPLE] = (1.0, 4.0)
    """lr_d / lr_g values (SAGAN paper, Sec. 4: 4)"""
    attn: Placements | None = None
    """tied placements, the same sizes in G and D, e.g. [[16], []]"""
    g_attn: Placements | None = None
    """or G's placements, crossed with d_attn (not with attn)"""
    d_attn: Placements | None = None
    """D's placements; all three null: the model's own placement"""
    seeds: Ints = (0,)
    """train.seed values: repeats of each combination"""
    search: Literal["grid", "random"] = "grid"
    """grid: every combination (x num_samples); random: num_samples random draws"""
    num_samples: Positive = 1
    """repeats of the grid, or random draws (see search)"""
    steps: Positive = 600
    """G steps per trial (train.steps of each trial)"""
    metric: Annotated[
        Literal[tuple(TUNE_METRICS)],
        Rule("{input} is not reported by the training loop; use one of " + ", ".join(TUNE_METRICS)),
    ] = "loop/fid"
    """in-loop metric ASHA and "best" use: loop/fid (min), loop/is or loop/class_acc (max)"""
    grace_period: Positive = 200
    """ASHA: steps every trial runs before it can be stopped"""
    reduction_factor: Annotated[float, Field(gt=1), YAML_FLOAT] = 2.0
    """ASHA: 1/reduction_factor of the trials go on at each rung"""
    max_concurrent_trials: Annotated[int, Field(ge=0), Rule("must be 0 (automatic) or more")] = 0
    """0: GPUs // GPUs per trial, or CPUs // CPUs per trial on a CPU cluster"""


class Config(ConfigModel):
    """The whole tree: one section per part of the system. configs/*.yaml set what differs from the defaults."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="after")
    def _consistent(self):
        """Checks across keys of the model and train sections (each key's own range is on its field)."""
        _check_attention(self.model)
        _check_compile_backend(self.train)
        return self


def _check_attention(m: ModelConfig) -> None:
    """Attention only after blocks the networks have, and at a width its query/key projections can divide."""
    from .models import attention_channels, check_attn_resolutions, d_block_resolutions, g_block_resolutions

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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The validated Config from defaults, then the YAML file at `path` (if any), then `overrides`."""
    return load_into(Config, path, overrides)


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A validated copy of `cfg` with dotted `key=value` overrides applied."""
    return build(type(cfg), merge(to_dict(cfg), parse_overrides(overrides)))


def validate(cfg: Config) -> Config:
    """`cfg` itself when its values are consistent (after assignments, which are not checked); ConfigError
    naming the key otherwise."""
    build(type(cfg), to_dict(cfg))
    return cfg


def to_dict(cfg: Config) -> dict:
    """The config as nested plain dicts (tuples become lists), ready for YAML or a checkpoint."""
    return plain(cfg.model_dump())


def from_dict(data: dict) -> Config:
    """The validated Config that `to_dict` produced."""
    return build(Config, data)


def flatten(cfg: Config | dict) -> dict[str, object]:
    """{"model.ch": 16, ...}: one entry per leaf key, as MLflow params want them (of a Config or of to_dict's output)."""
    tree = cfg if isinstance(cfg, dict) else to_dict(cfg)
    return {f"{section}.{k}": v for section, keys in tree.items() for k, v in keys.items()}


def dump_yaml(cfg: Config) -> str:
    """The whole resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def json_schema() -> dict:
    """The JSON schema of a config file (configs/schema.json), from the models: keys, types, ranges, docs."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **Config.model_json_schema()}


def schema_text() -> str:
    """configs/schema.json as it should read."""
    return json.dumps(json_schema(), indent=2) + "\n"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sagan.config", description="The config's JSON schema.")
    parser.add_argument("--schema", action="store_true", required=True, help=f"print it: {SCHEMA_COMMAND}")
    parser.parse_args()
    print(schema_text(), end="")
