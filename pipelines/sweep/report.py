"""The sweep's report on its MLflow parent run: a table of every trial (CSV and Markdown), a heatmap of the
best metric over TTUR ratio x attention placement, every trial's metric curve, and the best trial's config.

Rebuilt from Tune's trial records and the child runs' metric histories each time a trial ends, and once
more when the sweep ends, so the parent shows the state of the sweep while it runs.
"""

import csv
import io
import logging
import math
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from PIL import Image
from ray.tune import Callback

from pipelines.common.config import Config, from_dict
from pipelines.sweep.space import lr_d_of, metric_mode, trial_config
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


def placement_label(g: list, d: list) -> str:
    """ "16" when G and D share sizes [16], "none" for [], "G16 D32" when they differ."""

    def sizes(a):
        return "+".join(map(str, a)) or "none"

    return sizes(g) if list(g) == list(d) else f"G{sizes(g)} D{sizes(d)}"


def _history(client, run_id: str | None, key: str) -> list[tuple[int, float]]:
    """(step, value) of a metric, the latest value per step (a resumed run replays the steps after its checkpoint)."""
    if run_id is None:
        return []
    latest = {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}
    return sorted(latest.items())


def trial_rows(client, experiment_id: str, cfg: Config, records: list[dict]) -> tuple[list[dict], dict]:
    """One table row per trial record {trial_id, combo, status, error, last_result}, and each trial's curve of
    tune.metric. Trials that ASHA stopped end FINISHED on their child run (by design), with the reason as a tag."""
    metric, steps_wanted = cfg.tune.metric, cfg.tune.steps
    rows, curves = [], {}
    for rec in records:
        combo, tid = rec["combo"], rec["trial_id"]
        run_id = find_run(client, experiment_id, **{SWEEP_TAG: cfg.tune.name, TRIAL_TAG: tid})
        run = client.get_run(run_id) if run_id else None
        hist = {k: _history(client, run_id, k) for k in {metric, "loop/fid", "loop/is", "loop/class_acc", "d_loss"}}
        reported = int(rec["last_result"].get("step", 0))  # the last step Tune (and ASHA) saw
        steps = max([s for s, _ in hist["d_loss"]] + [reported])
        trained = [v for s, v in hist[metric] if s > 0 and math.isfinite(v)]  # step 0 scores the untrained G
        best = (min if metric_mode(cfg) == "min" else max)(trained) if trained else None
        status, reason = rec["status"], (run.data.tags.get(REASON_TAG) if run else None)
        run_status = None  # what the child run's status must become, once the trial has ended
        if status == "ERROR":
            status, reason, run_status = "failed", reason or rec.get("error") or "failed", "FAILED"
        elif status == "TERMINATED" and reason != "completed" and steps < steps_wanted:
            # Ended before its last step without a failure: ASHA stopped it at a rung.
            seen = [(s, v) for s, v in hist[metric] if s <= reported]
            status, run_status = "stopped", "FINISHED"  # stopped by design, not a crash: the reason says why
            reason = f"ASHA at step {seen[-1][0]} ({metric} {seen[-1][1]:.4g})" if seen else "stopped early"
        elif status == "TERMINATED":
            status, reason, run_status = "completed", "completed", "FINISHED"
        else:
            status, reason = status.lower(), ""
        if run and run_status and (run.info.status != run_status or run.data.tags.get(REASON_TAG) != reason):
            client.set_tag(run_id, REASON_TAG, reason)  # Tune's verdict is the final word on the child run
            client.set_terminated(run_id, run_status)
        final = {k: (hist[k][-1][1] if hist[k] else None) for k in ("loop/fid", "loop/is", "loop/class_acc")}
        rows.append(
            {
                "trial": tid,
                "ratio": combo["ratio"],
                "lr_g": combo["lr_g"],
                "lr_d": lr_d_of(combo),
                "g_attn": combo["g_attn"],
                "d_attn": combo["d_attn"],
                "seed": combo["seed"],
                "status": status,
                "steps": steps,
                "stop_reason": reason,
                "best": best,
                "final_fid": final["loop/fid"],
                "final_is": final["loop/is"],
                "final_class_acc": final["loop/class_acc"],
                "wall_s": round(rec["last_result"].get("time_total_s", 0.0), 1),
            }
        )
        curves[f"{tid}: ratio {combo['ratio']:g}, attention {placement_label(combo['g_attn'], combo['d_attn'])}"] = (
            hist[metric]
        )
    return rows, curves


def best_row(rows: list[dict], mode: str) -> dict | None:
    """The trial with the best score, among those that did not fail (a diverged config is no recommendation)."""
    scored = [r for r in rows if r["best"] is not None and r["status"] != "failed"]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda r: r["best"])


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


def write_report(
    client, experiment_id: str, parent_id: str, cfg: Config, records: list[dict]
) -> tuple[list[dict], dict | None]:
    """Log the table, heatmap, curves and best config to the parent run (replacing earlier versions) and the
    best score and hyper-parameters as its metric and tags. Returns (rows, best row)."""
    metric, mode = cfg.tune.metric, metric_mode(cfg)
    rows, curves = trial_rows(client, experiment_id, cfg, records)
    best = best_row(rows, mode)
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
    return rows, best


def _error_line(trial) -> str | None:
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        return lines[-1][:500] if lines else None
    return None


def record_from_trial(trial, status: str | None = None) -> dict:
    """What the report needs of a live Tune trial."""
    return {
        "trial_id": trial.trial_id,
        "combo": trial.config["trial"],
        "status": status or trial.status,
        "error": _error_line(trial),
        "last_result": dict(trial.last_result or {}),
    }


def records_from_results(results) -> list[dict]:
    """What the report needs of each trial in Tune's ResultGrid, once the sweep has ended or stopped."""
    records = []
    for r in results:
        metrics = dict(r.metrics or {})
        status = "ERROR" if r.error else ("TERMINATED" if metrics.get("done") else "PAUSED")
        error = str(r.error).strip().splitlines()[-1][:500] if r.error and str(r.error).strip() else None
        trial_id = metrics.get("trial_id") or Path(r.path).name.removeprefix("trial-")  # see trial_dirname
        records.append(
            {"trial_id": trial_id, "combo": r.config["trial"], "status": status, "error": error, "last_result": metrics}
        )
    return records


class ReportOnTrialEnd(Callback):
    """Rewrites the parent run's report whenever a trial completes, is stopped or fails."""

    def __init__(self, cfg: Config, tracking_uri: str, experiment_id: str, parent_id: str):
        self.config, self.uri, self.experiment_id, self.parent_id = to_dict(cfg), tracking_uri, experiment_id, parent_id

    def _write(self, trials, ended, status: str) -> None:
        records = [record_from_trial(t, status if t is ended else None) for t in trials]
        try:
            write_report(
                mlflow.MlflowClient(self.uri), self.experiment_id, self.parent_id, from_dict(self.config), records
            )
        except Exception as e:  # noqa: BLE001 - an interim report must never stop the sweep
            logging.getLogger("sagan.tune").warning(f"sweep report not updated: {type(e).__name__}: {e}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write(trials, trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write(trials, trial, "ERROR")
