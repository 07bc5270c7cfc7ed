"""The configuration tree: every key, its type, its default and what it means, in one place.

Defaults are the demo setting (32x32 digits on a laptop); `configs/*.yaml` override only what differs.
`load_config(path, ["optim.lr_d=4e-4", "model.g_attn=[32,64]"])` reads YAML, applies dotted overrides,
and rejects unknown keys and wrong types with an error naming the key.
"""

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError

INCEPTION = "inception-v3-compat"  # torch-fidelity's TF-ported Inception v3: the standard FID/IS network
SAMPLE_CLASSIFIER = "sample-classifier"  # a small CNN trained on the built-in sample set (offline)


@dataclass
class ModelConfig:
    resolution: int = 32  # image size: 32, 64 or 128
    ch: int = 16  # width multiplier; the paper uses 64 at 128px
    z_dim: int = 128  # latent size (SAGAN paper: 128)
    num_classes: int = 10  # must match the data's manifest
    g_attn: tuple[int, ...] = (16,)  # G feature-map sizes followed by self-attention; [] for none
    d_attn: tuple[int, ...] = (16,)  # D feature-map sizes followed by self-attention; [] for none
    g_sn: bool = True  # spectral norm on every conv/linear of G (not its class-conditional BN tables)
    d_sn: bool = True  # spectral norm on every conv/linear and the projection embedding of D


@dataclass
class OptimConfig:
    lr_g: float = 1e-4  # SAGAN paper, Sec. 5 (TTUR): lr_G = 1e-4
    lr_d: float = 4e-4  # SAGAN paper, Sec. 5 (TTUR): lr_D = 4e-4
    betas: tuple[float, float] = (0.0, 0.999)  # released code; the paper states (0, 0.9)
    n_dis: int = 1  # D updates per G update (SAGAN: 1)


@dataclass
class TrainConfig:
    steps: int = 1000  # G updates in total
    batch_size: int = 32  # per worker: the global batch is batch_size x scaling.num_workers
    precision: str = (
        "auto"  # auto (bf16 on GPUs, fp32 on CPUs), fp32, bf16 (autocast) or fp16 (autocast + loss scaling)
    )
    channels_last: bool | None = None  # NHWC layout for G and D; null (or auto): on for GPUs, off on CPUs
    compile: bool | None = (
        None  # torch.compile G and D (the first steps take minutes); null (or auto): on for GPUs, off on CPUs
    )
    compile_backend: str = "inductor"  # torch.compile backend; "aot_eager" needs no compiler toolchain (debugging)
    seed: int = 0
    ema_decay: float = 0.99  # EMA of G's weights for sampling; BigGAN uses 0.9999 at ImageNet scale
    ema_start: int = 0  # before this step the EMA copies G instead of averaging
    log_every: int = 25  # steps between metric lines / MLflow points
    sample_every: int = 250  # steps between sample grids and attention maps
    ckpt_every: int = 250  # steps between checkpoints
    eval_every: int = 0  # steps between in-loop FID evaluations; 0 turns them off
    # Divergence guard: stop when a loss or D's mean score exceeds diverge_factor x its largest earlier |value|
    # (at least 1) in diverge_patience readings in a row (log, sample, checkpoint and eval steps); 0: off.
    diverge_factor: float = 100.0
    diverge_patience: int = 3


@dataclass
class DataConfig:
    train_shards: str = "data/sample/shards/train"  # shard directory, brace pattern or manifest.json
    val_shards: str = "data/sample/shards/val"  # the same, for the real statistics of FID
    verify: str = "full"  # before training: full (sizes, then sha256 in Ray tasks), size (stat only) or off
    loader_workers: int | None = (
        None  # decoding processes per rank; null: the rank's CPUs (scaling.cpus_per_worker, at least 1); 0: in the training process
    )
    prefetch: int = 4  # batches each loader process decodes ahead


@dataclass
class EvalConfig:
    num_samples: int = 50000  # generated images per FID/IS in pipelines/evaluate.py (the standard protocol: 50k)
    loop_samples: int = 5000  # generated images per in-loop FID (every train.eval_every steps): faster, noisier
    feature_extractor: str = INCEPTION  # or "sample-classifier" for the built-in digits (trained on their train split)
    inception_weights: str | None = None  # local weights-inception-2015-12-05-6726825d.pth, for clusters offline
    real_split: str = "val"  # real statistics from data.val_shards ("val") or data.train_shards ("train")
    batch_size: int = 250  # images per generator and feature-extractor batch
    cache_dir: str | None = None  # real statistics, sample classifier; default <shards root>/cache or ~/.cache/sagan
    seed: int = 0  # latents and labels of the scored samples: the same on every evaluation


@dataclass
class ScalingConfig:
    num_workers: int = 2  # Ray Train workers, one per GPU when use_gpu
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional CPUs leave Ray Data a budget on small machines
    placement_strategy: str = "PACK"  # Ray's: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD (one worker per node)


@dataclass
class RunConfig:
    name: str = "sagan-demo"  # a run restarted with the same name resumes from its last checkpoint
    storage_path: str = "runs"  # checkpoints and results; shared storage (S3, GCS, NFS) on multi-node
    max_failures: int = 2  # worker failures tolerated before the run fails
    keep_checkpoints: int = 2  # most recent checkpoints kept


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "sagan-train"


@dataclass
class TuneConfig:
    """pipelines/tune.py: the study of SAGAN's Table 1 (attention placement) x Sec. 4 (TTUR ratio) as one sweep."""

    name: str = "sagan-tune-demo"  # the sweep: its folder under run.storage_path, its MLflow parent; rerun to resume
    experiment: str = "sagan-tune"  # MLflow experiment holding the parent run and one child run per trial
    lr_g: tuple[float, ...] = (1e-4,)  # G learning rates (one value: fixed)
    ratio: tuple[float, ...] = (1.0, 4.0)  # lr_d / lr_g values (SAGAN paper, Sec. 4: 4)
    attn: tuple[tuple[int, ...], ...] | None = None  # tied placements, the same sizes in G and D, e.g. [[16], []]
    g_attn: tuple[tuple[int, ...], ...] | None = None  # or G's placements, crossed with d_attn (not with attn)
    d_attn: tuple[tuple[int, ...], ...] | None = None  # D's placements; all three null: the model's own placement
    seeds: tuple[int, ...] = (0,)  # train.seed values: repeats of each combination
    search: str = "grid"  # grid: every combination (x num_samples); random: num_samples random draws
    num_samples: int = 1
    steps: int = 600  # G steps per trial (train.steps of each trial)
    metric: str = "loop/fid"  # in-loop metric ASHA and "best" use: loop/fid (min), loop/is or loop/class_acc (max)
    grace_period: int = 200  # ASHA: steps every trial runs before it can be stopped
    reduction_factor: float = 2.0  # ASHA: 1/reduction_factor of the trials go on at each rung
    max_concurrent_trials: int = 0  # 0: GPUs // GPUs per trial, or CPUs // CPUs per trial on a CPU cluster


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


class ConfigError(UserError, ValueError):
    """A config key that does not exist, or a value of the wrong type; the message names the key."""


_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DATA_VERIFY = ("full", "size", "off")
_OFF_KEYS = {"data.verify"}  # string keys for which "off" is a value


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """`value` converted to the annotated type `tp`, or ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        if value is None or (value == "auto" and bool in args):  # train.compile=auto reads as null
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in items)
        if len(items) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(items, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # YAML 1.1 reads "1e-4" as a string and "0" as an int: both are fine floats.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if value is False and key in _OFF_KEYS:  # YAML 1.1 reads an unquoted `off` as false
            return "off"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls, data: dict, prefix: str):
    """An instance of dataclass `cls` with `data` applied over its defaults."""
    if data is None:  # a section whose keys are all commented out
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(sorted(names))}")
    obj = cls()
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            setattr(obj, name, _build(tp, value, f"{prefix}{name}."))
        else:
            setattr(obj, name, _coerce(value, tp, f"{prefix}{name}"))
    return obj


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is a value, not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Nested dict from ["a.b=value", ...]; values are read as YAML (numbers, lists, true/false, null)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(cfg: Config) -> Config:
    """`cfg` itself when its values are consistent; ConfigError naming the key otherwise."""
    from .models import attention_channels, check_attn_resolutions, d_block_resolutions, g_block_resolutions

    m, t = cfg.model, cfg.train
    if m.resolution not in (32, 64, 128):
        raise ConfigError(f"model.resolution: {m.resolution} is not supported; use 32, 64 or 128")
    try:
        check_attn_resolutions("model.g_attn", m.g_attn, g_block_resolutions(m.resolution))
        check_attn_resolutions("model.d_attn", m.d_attn, d_block_resolutions(m.resolution))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for where, channels in attention_channels(m.resolution, m.ch, m.g_attn, m.d_attn).items():
        if channels % 8:
            raise ConfigError(
                f"model.ch: attention at {where} would have {channels} channels; it needs a multiple of 8"
            )
    if cfg.eval.feature_extractor not in (INCEPTION, SAMPLE_CLASSIFIER):
        raise ConfigError(
            f"eval.feature_extractor: '{cfg.eval.feature_extractor}' is not one of {INCEPTION}, {SAMPLE_CLASSIFIER}"
        )
    if cfg.scaling.placement_strategy not in PLACEMENT_STRATEGIES:
        raise ConfigError(
            f"scaling.placement_strategy: '{cfg.scaling.placement_strategy}' is not one of "
            f"{', '.join(PLACEMENT_STRATEGIES)}"
        )
    if cfg.eval.real_split not in ("val", "train"):
        raise ConfigError(f"eval.real_split: '{cfg.eval.real_split}' is not one of val, train")
    if cfg.data.loader_workers is not None and cfg.data.loader_workers < 0:
        raise ConfigError(
            f"data.loader_workers: must be 0 or more (or null for the rank's CPUs), got {cfg.data.loader_workers}"
        )
    if cfg.data.prefetch < 1:
        raise ConfigError(f"data.prefetch: must be at least 1, got {cfg.data.prefetch}")
    if cfg.data.verify not in DATA_VERIFY:
        raise ConfigError(f"data.verify: '{cfg.data.verify}' is not one of {', '.join(DATA_VERIFY)}")
    if t.precision not in _PRECISIONS:
        raise ConfigError(f"train.precision: '{t.precision}' is not one of {', '.join(_PRECISIONS)}")
    if t.compile is not False and t.compile_backend != "inductor":
        from torch._dynamo import list_backends

        if t.compile_backend not in list_backends(exclude_tags=()):
            raise ConfigError(
                f"train.compile_backend: '{t.compile_backend}' is not a torch.compile backend; "
                f"use one of {', '.join(list_backends(exclude_tags=()))}"
            )
    positive = {
        "model.ch": m.ch,
        "model.z_dim": m.z_dim,
        "model.num_classes": m.num_classes,
        "optim.n_dis": cfg.optim.n_dis,
        "train.steps": t.steps,
        "train.batch_size": t.batch_size,
        "train.log_every": t.log_every,
        "train.sample_every": t.sample_every,
        "train.ckpt_every": t.ckpt_every,
        "eval.batch_size": cfg.eval.batch_size,
        "scaling.num_workers": cfg.scaling.num_workers,
        "run.keep_checkpoints": cfg.run.keep_checkpoints,
        "train.diverge_patience": t.diverge_patience,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    for key, value in {
        "optim.lr_g": cfg.optim.lr_g,
        "optim.lr_d": cfg.optim.lr_d,
        "scaling.cpus_per_worker": cfg.scaling.cpus_per_worker,
    }.items():
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{key}: must be a finite number above 0, got {value}")
    for key, value in {
        "train.eval_every": t.eval_every,
        "train.ema_start": t.ema_start,
        "train.diverge_factor": t.diverge_factor,
        "run.max_failures": cfg.run.max_failures,
    }.items():
        if value < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {value}")
    for key, value in {"eval.num_samples": cfg.eval.num_samples, "eval.loop_samples": cfg.eval.loop_samples}.items():
        if value < 10:  # the Inception Score's 10 splits
            raise ConfigError(f"{key}: must be at least 10 (IS uses 10 splits), got {value}")
    if 0 < t.diverge_factor <= 1 or not math.isfinite(t.diverge_factor):
        raise ConfigError(f"train.diverge_factor: must be 0 (off) or above 1, got {t.diverge_factor}")
    _validate_tune(cfg.tune)
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), got {t.ema_decay}")
    if not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: each must be in [0, 1), got {list(cfg.optim.betas)}")
    return cfg


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement groups
TUNE_METRICS = {"loop/fid": "min", "loop/is": "max", "loop/class_acc": "max"}  # in-loop metric -> better when


def _validate_tune(u: TuneConfig) -> None:
    """The tune section's own values; the search space against the model is checked by the sweep (pipelines.sweep.space)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", u.name):
        raise ConfigError(
            f"tune.name: '{u.name}' must be letters, digits, '.', '_' or '-' (it names a folder and MLflow tags)"
        )
    if u.search not in ("grid", "random"):
        raise ConfigError(f"tune.search: '{u.search}' is not one of grid, random")
    if u.metric not in TUNE_METRICS:
        raise ConfigError(
            f"tune.metric: '{u.metric}' is not reported by the training loop; use one of {', '.join(TUNE_METRICS)}"
        )
    for key in ("num_samples", "steps", "grace_period"):
        if getattr(u, key) <= 0:
            raise ConfigError(f"tune.{key}: must be positive, got {getattr(u, key)}")
    if u.max_concurrent_trials < 0:
        raise ConfigError(f"tune.max_concurrent_trials: must be 0 (automatic) or more, got {u.max_concurrent_trials}")
    if not u.reduction_factor > 1:
        raise ConfigError(f"tune.reduction_factor: must be above 1, got {u.reduction_factor}")
    for key in ("lr_g", "ratio"):
        bad = [v for v in getattr(u, key) if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ConfigError(f"tune.{key}: every value must be a finite number above 0, got {bad[0]}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The validated Config from defaults, then the YAML file at `path` (if any), then `overrides`."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            context = f" ({e.context})" if getattr(e, "context", None) else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}: {what}{context}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of sections (model:, optim:, ...), got {type(data).__name__}"
            )
    data = _merge(data, parse_overrides(overrides or []))
    return validate(_build(Config, data, ""))


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A validated copy of `cfg` with dotted `key=value` overrides applied."""
    return validate(_build(Config, _merge(to_dict(cfg), parse_overrides(overrides)), ""))


def to_dict(cfg: Config) -> dict:
    """The config as nested plain dicts (tuples become lists), ready for YAML or a checkpoint."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return list(v) if isinstance(v, tuple) else v

    return plain(dataclasses.asdict(cfg))


def from_dict(data: dict) -> Config:
    """The validated Config that `to_dict` produced."""
    return validate(_build(Config, data, ""))


def flatten(cfg: Config | dict) -> dict[str, object]:
    """{"model.ch": 16, ...}: one entry per leaf key, as MLflow params want them (of a Config or of to_dict's output)."""
    tree = cfg if isinstance(cfg, dict) else to_dict(cfg)
    return {f"{section}.{k}": v for section, keys in tree.items() for k, v in keys.items()}


def dump_yaml(cfg: Config) -> str:
    """The whole resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
