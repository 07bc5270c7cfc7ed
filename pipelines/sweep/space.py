"""The sweep's search space: the combinations of lr_g, ratio, attention placement and seed, checked against the
model before Ray starts, and the record that a rerun of the same tune.name keeps the same sweep.
"""

import itertools
import json
import uuid

from pipelines.common.config import TUNE_METRICS, Config
from sagan.config import ConfigError, flatten, to_dict, with_overrides
from sagan.errors import UserError
from sagan.folder import Folder

SPACE_FILE = "sweep.json"  # in the sweep's folder: its config and id; a rerun must not silently change them
DRIVER_CPU = 0.01  # what a trial's driver function reserves; its Train workers reserve their own


class SweepError(UserError, ValueError):
    """A search space that cannot run; the message names the key and the fix."""


def placements(cfg: Config) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(G sizes, D sizes) per placement: tune.attn tied, else tune.g_attn x tune.d_attn (a side left null keeps
    the model's own placement), else the model's own placement alone."""
    t = cfg.tune
    if t.attn is not None:
        return [(tuple(a), tuple(a)) for a in t.attn]
    g = t.g_attn if t.g_attn is not None else (tuple(cfg.model.g_attn),)
    d = t.d_attn if t.d_attn is not None else (tuple(cfg.model.d_attn),)
    return [(tuple(a), tuple(b)) for a, b in itertools.product(g, d)]


def lr_d_of(combo: dict) -> float:
    """lr_g x ratio without float noise (1e-4 x 3 is 3.0000000000000004e-05)."""
    return float(f"{combo['lr_g'] * combo['ratio']:.10g}")


def combinations(cfg: Config) -> list[dict]:
    """Every trial setting of the search space: {"lr_g", "ratio", "g_attn", "d_attn", "seed"}."""
    t = cfg.tune
    return [
        {"lr_g": lr, "ratio": ratio, "g_attn": list(g), "d_attn": list(d), "seed": seed}
        for lr, ratio, (g, d), seed in itertools.product(t.lr_g, t.ratio, placements(cfg), t.seeds)
    ]


def trial_config(base: Config, combo: dict) -> Config:
    """The training config of one trial: `base` with the combination's values and tune.steps steps."""
    return with_overrides(
        base,
        [
            f"optim.lr_g={combo['lr_g']}",
            f"optim.lr_d={lr_d_of(combo)}",
            f"model.g_attn={combo['g_attn']}",
            f"model.d_attn={combo['d_attn']}",
            f"train.seed={combo['seed']}",
            f"train.steps={base.tune.steps}",
        ],
    )


def check_sweep(cfg: Config) -> list[dict]:
    """The combinations of cfg's search space, or SweepError for one that cannot run (checked before any trial)."""
    t = cfg.tune
    if cfg.scaling.elastic:  # docs/tuning.md: why trials are not elastic
        raise SweepError(
            f"scaling.num_workers={list(cfg.scaling.num_workers)}: a sweep's trials take a fixed number of workers "
            "(Tune reserves each trial's resources up front and ASHA compares trials at equal steps); give one number"
        )
    if t.attn is not None and (t.g_attn is not None or t.d_attn is not None):
        raise SweepError(
            "tune.attn (tied placements) and tune.g_attn / tune.d_attn (crossed) are both set; "
            "set tune.attn=null to cross G's and D's placements, or drop g_attn / d_attn"
        )
    for key in ("lr_g", "ratio", "seeds"):
        if not getattr(t, key):
            raise SweepError(f"tune.{key} is empty: the search space has no trial; give it at least one value")
    if not placements(cfg):
        raise SweepError(
            "tune.attn (or tune.g_attn / tune.d_attn) is empty: the search space has no trial; "
            "[[]] is one placement without attention"
        )
    combos = combinations(cfg)
    for combo in combos:
        try:
            trial_config(cfg, combo)
        except ConfigError as e:
            raise SweepError(f"tune: the trial {combo} is not a valid training config: {e}") from None
    if not cfg.train.eval_every:
        raise SweepError(
            f"tune.metric {t.metric} is reported only with in-loop evaluation; set train.eval_every "
            f"to a few steps (at most tune.grace_period = {t.grace_period})"
        )
    if t.metric == "loop/class_acc" and cfg.eval.feature_extractor != "sample-classifier":
        raise SweepError("tune.metric loop/class_acc is reported only with eval.feature_extractor=sample-classifier")
    if t.grace_period >= t.steps:
        raise SweepError(
            f"tune.grace_period ({t.grace_period}) must be below tune.steps ({t.steps}) for ASHA to stop anything"
        )
    if cfg.train.eval_every > t.grace_period:
        raise SweepError(
            f"train.eval_every ({cfg.train.eval_every}) exceeds tune.grace_period ({t.grace_period}): ASHA "
            "would have no metric to compare at its first rung; lower train.eval_every"
        )
    return combos


def check_same_sweep(sweep_dir: str, combos: list[dict], cfg: Config, restorable: bool) -> str:
    """Record the sweep (its whole config and combinations, and a new sweep id) in its folder (a path or an
    object-storage URL). When Tune has state to restore, SweepError if anything changed: the restored trials
    would mix old and new settings. Returns the sweep id, which tags the MLflow parent: a sweep started afresh
    gets a parent of its own."""
    record = {"config": to_dict(cfg), "combinations": combos}
    files = Folder(sweep_dir)
    text = files.read_text(SPACE_FILE) if restorable else None
    if restorable and text is None:  # saved on object storage before its settings were recorded there: it
        record["sweep_id"] = cfg.tune.name  # was known by tune.name, which keeps its MLflow parent run
        files.write_text(SPACE_FILE, json.dumps(record, indent=1))
        return record["sweep_id"]
    if text is not None:
        saved = json.loads(text)
        # How the data is checked changes no trial's result (and sweeps recorded before the key lack it).
        saved.get("config", {}).get("data", {})["verify"] = cfg.data.verify
        if {k: saved.get(k) for k in record} != json.loads(json.dumps(record)):
            old, new = flatten(saved.get("config", {})), flatten(json.loads(json.dumps(record["config"])))
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)) or ["tune combinations"]
            more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            raise SweepError(
                f"sweep {cfg.tune.name} exists ({sweep_dir}) with other settings ({', '.join(changed[:5])}"
                f"{more}; relative paths count from the directory you run in); rerun it unchanged to "
                "resume it, or choose another tune.name"
            )
        return saved["sweep_id"]
    files.make_folder()
    record["sweep_id"] = uuid.uuid4().hex
    files.write_text(SPACE_FILE, json.dumps(record, indent=1))
    return record["sweep_id"]


def concurrency(cfg: Config, cluster: dict) -> int:
    """tune.max_concurrent_trials, or how many trials the cluster holds at once: GPUs // GPUs per trial, or
    CPUs // CPUs per trial (Tune does not count the Train workers a trial starts, so this is the throttle)."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    s = cfg.scaling
    by_cpu = int(cluster.get("CPU", 0) // (s.max_workers * s.cpus_per_worker + DRIVER_CPU))
    by_gpu = int(cluster.get("GPU", 0) // s.max_workers) if s.use_gpu else by_cpu
    return max(1, min(by_cpu, by_gpu))


def param_space(cfg: Config, combos: list[dict]) -> dict:
    """Tune's param_space: the combinations as one grid (or one choice, for random search)."""
    from ray import tune  # here, not at the top: tune.py checks the space before Ray Tune loads (seconds)

    return {"trial": tune.grid_search(combos) if cfg.tune.search == "grid" else tune.choice(combos)}


def metric_mode(cfg: Config) -> str:
    return TUNE_METRICS[cfg.tune.metric]
