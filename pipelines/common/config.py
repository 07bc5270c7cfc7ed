"""The pipelines' configuration: the model library's sections (sagan.config) plus Ray's workers, the run, MLflow
and the sweep, which only the pipelines read. `load_config` reads a configs/*.yaml file and `key=value`
overrides into this whole tree; configs/schema.json is its JSON schema, for editors (`python -m
pipelines.common.config --schema > configs/schema.json` regenerates it; a test checks that it is current).
"""

import argparse
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field
from pydantic_core import PydanticCustomError

from sagan.config import SaganConfig
from sagan.config import from_dict as _from_dict
from sagan.config import load_config as _load_config
from sagan.config_loading import (
    TUPLE,
    YAML_FLOAT,
    ConfigModel,
    Ints,
    NonNegative,
    Positive,
    PositiveFinite,
    Rule,
    Str,
    number_as_text,
)

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement groups
TUNE_METRICS = {"loop/fid": "min", "loop/is": "max", "loop/class_acc": "max"}  # in-loop metric -> better when
SCHEMA_FILE = Path(__file__).resolve().parents[2] / "configs" / "schema.json"
SCHEMA_COMMAND = "python -m pipelines.common.config --schema > configs/schema.json"
Placements = Annotated[tuple[Ints, ...], TUPLE]


def workers_range(value):
    """scaling.num_workers: N (a fixed size) or [MIN, MAX] (elastic, 1 <= MIN <= MAX); [N] is N."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not (1 <= len(items) <= 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items)):
        raise PydanticCustomError("workers", "not a number of workers")
    if len(items) == 1 or items[0] == items[1]:
        return items[0]
    if items[0] > items[1]:
        raise PydanticCustomError("workers", "minimum above maximum")
    return tuple(items)


class ScalingConfig(ConfigModel):
    """Ray Train's workers."""

    num_workers: Annotated[
        Positive | tuple[Positive, Positive],
        BeforeValidator(workers_range),
        Rule("{input} is neither a number of workers (1 or more) nor [MIN, MAX] with 1 <= MIN <= MAX (elastic)"),
    ] = 2
    """Ray Train workers, one per GPU when use_gpu; [MIN, MAX]: elastic, any size in between, the data and the
    global batch (train.batch_size x MAX) the same at every size"""
    resize_check_s: PositiveFinite = 60.0
    """elastic runs: how often Ray Train checks whether more workers can be placed (and grows the group)"""
    use_gpu: bool = False
    """one GPU per worker"""
    cpus_per_worker: PositiveFinite = 0.5
    """fractional CPUs leave Ray Data a budget on small machines"""
    placement_strategy: Literal[PLACEMENT_STRATEGIES] = "PACK"
    """Ray's: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD (one worker per node)"""
    placement_timeout_s: PositiveFinite = 600.0
    """how long to wait for the workers to be placed (a lost node, a busy cluster) before the run fails naming
    what is missing; a node back within it lets the run go on"""

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        """The workers of a full group: the data's virtual ranks, and the global batch's share count."""
        return self.num_workers[1] if self.elastic else self.num_workers

    def describe(self) -> str:
        return (
            f"{self.min_workers}-{self.max_workers} workers (elastic)"
            if self.elastic
            else f"{self.num_workers} worker(s)"
        )


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


class Config(SaganConfig):
    """The whole tree: the library's sections, then the pipelines'. configs/*.yaml set what differs."""

    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The validated Config from defaults, then the YAML file at `path` (if any), then `overrides`."""
    return _load_config(path, overrides, root=Config)


def from_dict(data: dict) -> Config:
    """The validated Config that `to_dict` produced (a checkpoint's, a Ray worker's)."""
    return _from_dict(data, root=Config)


def json_schema() -> dict:
    """The JSON schema of a config file (configs/schema.json), from the models: keys, types, ranges, docs."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **Config.model_json_schema()}


def schema_text() -> str:
    """configs/schema.json as it should read."""
    return json.dumps(json_schema(), indent=2) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m pipelines.common.config", description="The config's JSON schema.")
    parser.add_argument("--schema", action="store_true", required=True, help=f"print it: {SCHEMA_COMMAND}")
    parser.parse_args()
    print(schema_text(), end="")
