"""The sweep's report on its MLflow parent run: a table of every trial (CSV and Markdown), a heatmap of the
best metric over TTUR ratio x attention placement, every trial's metric curve, and the best trial's config.

Rebuilt from what the trials reported to Tune (pipelines.sweep.outcomes) each time a trial ends, and once more
when the sweep ends, so the parent shows the state of the sweep while it runs.
"""

import csv
import io
import logging
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from PIL import Image
from ray.tune import Callback

from pipelines.common.config import Config, from_dict
from pipelines.sweep.asha import saved_results
from pipelines.sweep.outcomes import (
    best_row,
    merge,
    placement_label,
    read_history,
    record_from_trial,
    trial_rows,
    write_history,
)
from pipelines.sweep.space import metric_mode, trial_config
from pipelines.sweep.trials import REASON_TAG, SWEEP_TAG, TRIAL_TAG
from pipelines.tracking.store import find_run
from sagan.config import dump_yaml, to_dict
from sagan.viz import heatmap, metric_curves

COLUMNS = [
    "trial",
    "ratio",
    "lr_g",
    "lr_d",
    "g_attn",
    "d_attn",
    "seed",
    "status",
    "steps",
    "stop_reason",
    "best",
    "final_fid",
    "final_is",
    "final_class_acc",
    "wall_s",
]


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def table_csv(rows: list[dict], metric: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([f"best_{metric}" if c == "best" else c for c in COLUMNS])
    for r in rows:
        writer.writerow([_fmt(r[c]) for c in COLUMNS])
    return out.getvalue()


def table_markdown(rows: list[dict], metric: str) -> str:
    header = [f"best {metric}" if c == "best" else c for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def best_heatmap(rows: list[dict], metric: str, mode: str) -> np.ndarray:
    """Best metric per (placement, ratio) cell, over learning rates and seeds."""
    ratios = sorted({r["ratio"] for r in rows})
    places = list(dict.fromkeys(placement_label(r["g_attn"], r["d_attn"]) for r in rows))
    grid = np.full((len(places), len(ratios)), np.nan)
    pick = np.nanmin if mode == "min" else np.nanmax
    for r in rows:
        if r["best"] is not None and r["status"] != "failed":  # as best_row: a diverged trial recommends nothing
            i, j = places.index(placement_label(r["g_attn"], r["d_attn"])), ratios.index(r["ratio"])
            grid[i, j] = pick([grid[i, j], r["best"]])
    return heatmap(
        grid,
        places,
        [f"{x:g}" for x in ratios],
        f"best {metric} ({'lower' if mode == 'min' else 'higher'} is better)",
        "TTUR ratio lr_D / lr_G",
        "attention at",
        best_low=mode == "min",
    )


def settle_child_runs(client, experiment_id: str, cfg: Config, rows: list[dict]) -> None:
    """Tune's verdict is the final word on an ended trial's child run: FINISHED for a completed trial and for
    one ASHA stopped (by design, the reason as a tag), FAILED for a failure (with its own reason, when set)."""
    for row in rows:
        run_status = {"completed": "FINISHED", "stopped": "FINISHED", "failed": "FAILED"}.get(row["status"])
        run_id = find_run(client, experiment_id, **{SWEEP_TAG: cfg.tune.name, TRIAL_TAG: row["trial"]})
        if run_status is None or run_id is None:
            continue
        run = client.get_run(run_id)
        reason = (row["status"] == "failed" and run.data.tags.get(REASON_TAG)) or row["stop_reason"]
        if run.info.status != run_status or run.data.tags.get(REASON_TAG) != reason:
            client.set_tag(run_id, REASON_TAG, reason)
            client.set_terminated(run_id, run_status)


def write_report(
    client, experiment_id: str, parent_id: str, cfg: Config, rows: list[dict], curves: dict
) -> dict | None:
    """Log the table, heatmap, curves and best config to the parent run (replacing earlier versions) and the
    best score and hyper-parameters as its metric and tags; settle the ended trials' child runs. Returns the
    best row."""
    metric, mode = cfg.tune.metric, metric_mode(cfg)
    best = best_row(rows, mode)
    settle_child_runs(client, experiment_id, cfg, rows)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "report"
        folder.mkdir()
        (folder / "trials.csv").write_text(table_csv(rows, metric))
        (folder / "trials.md").write_text(table_markdown(rows, metric))
        if any(r["best"] is not None for r in rows):
            Image.fromarray(best_heatmap(rows, metric, mode)).save(folder / "heatmap.png")
            stopped = {
                label
                for label in curves
                if label.split(":")[0] in {r["trial"] for r in rows if r["status"] == "stopped"}
            }
            Image.fromarray(metric_curves(curves, metric, stopped)).save(folder / "curves.png")
        if best:
            combo = {k: best[k] for k in ("lr_g", "ratio", "g_attn", "d_attn", "seed")}
            best_cfg = trial_config(cfg, combo)
            best_cfg.run.name = f"{cfg.tune.name}-best"
            header = (
                f"# The best trial of sweep {cfg.tune.name}: {best['trial']}, best {metric} {best['best']:.4g}.\n"
                f"# Train it longer with: python pipelines/train.py --config best_config.yaml train.steps=N\n"
            )
            (folder / "best_config.yaml").write_text(header + dump_yaml(best_cfg))
        client.log_artifacts(parent_id, str(folder), "report")
    # The parent's description in MLflow's UI (rendered as Markdown): the table, and the best trial.
    verdict = f"Best: trial {best['trial']}, {metric} {best['best']:.4g}.\n\n" if best else ""
    client.set_tag(parent_id, "mlflow.note.content", f"Sweep {cfg.tune.name}. {verdict}{table_markdown(rows, metric)}")
    if best:
        client.log_metric(parent_id, f"best_{metric.replace('/', '_')}", best["best"])
        for k in ("trial", "lr_g", "lr_d", "ratio", "g_attn", "d_attn", "seed"):
            client.set_tag(parent_id, f"best.{k}", _fmt(best[k]))
    return best


class ReportOnTrialEnd(Callback):
    """Rewrites the parent run's report whenever a trial completes, is stopped or fails, from the results the
    trials reported: kept here as they arrive, and in the sweep's folder (outcomes.write_history), from which a
    restored sweep reads them back (its trials' result.json may hold only what came after the restore)."""

    histories = sweep_dir = None  # also for a callback unpickled from a sweep saved by an older version

    def __init__(self, cfg: Config, tracking_uri: str, experiment_id: str, parent_id: str, sweep_dir: str):
        self.config, self.uri, self.experiment_id, self.parent_id = to_dict(cfg), tracking_uri, experiment_id, parent_id
        self.sweep_dir, self.histories = sweep_dir, {}

    def _history(self, trial) -> list[dict]:
        if self.histories is None:
            self.histories = {}
        if trial.trial_id not in self.histories:  # first seen: what it reported before a restore
            kept = read_history(self.sweep_dir, trial.trial_id) if self.sweep_dir else []
            try:
                saved = saved_results(trial.local_path)
            except RuntimeError:  # a trial not started yet has no folder
                saved = []
            self.histories[trial.trial_id] = merge(kept, saved, self.config["tune"]["metric"])
        return self.histories[trial.trial_id]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        history = merge(self._history(trial), [result], self.config["tune"]["metric"])
        self.histories[trial.trial_id] = history
        if self.sweep_dir:
            try:
                write_history(self.sweep_dir, trial.trial_id, history)
            except OSError as e:  # the report falls back on Tune's own files
                logging.getLogger("sagan.tune").warning(f"trial {trial.trial_id}'s history not kept: {e}")

    def _write(self, trials, ended, status: str) -> None:
        records = [record_from_trial(t, self._history(t), status if t is ended else None) for t in trials]
        try:
            cfg = from_dict(self.config)
            rows, curves = trial_rows(cfg, records)
            write_report(mlflow.MlflowClient(self.uri), self.experiment_id, self.parent_id, cfg, rows, curves)
        except Exception as e:  # noqa: BLE001 - an interim report must never stop the sweep
            logging.getLogger("sagan.tune").warning(f"sweep report not updated: {type(e).__name__}: {e}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write(trials, trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write(trials, trial, "ERROR")
