"""What each trial of the sweep measured, from the trials' own results (what rank 0 reported to Tune), never
from what the tracking server happened to receive: during an outage a trial's in-loop scores wait in its
pending folder, and a table built from the server would show a blank best and pick another trial.

A record is {trial_id, combo, status (Tune's), error, history}: `history` is the trial's reported results
in step order, the latest per step (a resumed trial reports the steps after its checkpoint again).
"""

import json
import math
from pathlib import Path

from pipelines.sweep.space import lr_d_of, metric_mode
from sagan.errors import first_line
from sagan.storage import filesystem, is_url

SCORES = ("loop/fid", "loop/is", "loop/class_acc")
KEPT = ("step", "done", "time_total_s", *SCORES)  # what the report needs of a result, besides tune.metric


def keep(result: dict, metric: str) -> dict:
    """The part of one reported result the report uses, without the missing (NaN) scores of a results table."""
    out = {}
    for key in {*KEPT, metric}:
        value = result.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            out[key] = value
    return out


def merge(history: list[dict], results: list[dict], metric: str) -> list[dict]:
    """`history` with `results` added: one entry per step (the later one wins), in step order."""
    by_step = {int(r["step"]): r for r in history}
    for result in results:
        if "step" in result:
            by_step[int(result["step"])] = keep(result, metric)
    return [by_step[s] for s in sorted(by_step)]


HISTORIES = "trial-histories"  # in the sweep's folder: each trial's merged history, kept across restores


def read_history(sweep_dir: str, trial_id: str) -> list[dict]:
    """The history the sweep's driver kept for a trial (a restored sweep's result.json files may hold only the
    steps reported since the restore), or []."""
    fs, path = filesystem(f"{sweep_dir}/{HISTORIES}/{trial_id}.json")
    try:
        with fs.open_input_stream(path) as f:
            history = json.loads(f.read())
    except (OSError, ValueError):
        return []
    return history if isinstance(history, list) else []


def write_history(sweep_dir: str, trial_id: str, history: list[dict]) -> None:
    """Replace the kept history of a trial in one step (a local rename, or one object PUT)."""
    fs, path = filesystem(f"{sweep_dir}/{HISTORIES}/{trial_id}.json")
    body = json.dumps(history).encode()
    if is_url(sweep_dir):
        with fs.open_output_stream(path) as f:
            f.write(body)
        return
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(body)
    fs.move(tmp, path)


def _error_line(error) -> str | None:
    """The last line of a trial's error (a Tune error file's path, or the exception), without the wrapper
    type that the trial's own one-line reason (pipelines.sweep.trials.run_trial) was raised in."""
    if error is None:
        return None
    if isinstance(error, (str, Path)) and Path(error).is_file():
        lines = [line for line in Path(error).read_text().splitlines() if line.strip()]
        text = lines[-1] if lines else ""
    else:
        text = str(error).strip().splitlines()[-1] if str(error).strip() else first_line(error)
    return text.removeprefix("RuntimeError: ")[:500] or None


def _error_file(trial) -> str | None:
    try:
        return getattr(trial, "error_file", None)
    except RuntimeError:  # a trial without a folder yet
        return None


def record_from_trial(trial, history: list[dict], status: str | None = None) -> dict:
    """What the report needs of a live Tune trial, with the results it reported so far."""
    return {
        "trial_id": trial.trial_id,
        "combo": trial.config["trial"],
        "status": status or trial.status,
        "error": _error_line(_error_file(trial)),
        "history": history,
    }


def records_from_results(results, metric: str, sweep_dir: str | None = None) -> list[dict]:
    """What the report needs of each trial in Tune's ResultGrid, once the sweep has ended or stopped. Each
    trial's whole history comes from what the driver kept (`read_history`) and its saved results. A last result marked done is a trial
    Tune ended (completed, or stopped by ASHA); one that is not was interrupted (Ctrl-C) and resumes on a
    rerun. A trial that reached its last step is completed either way (see `outcome`)."""
    records = []
    for r in results:
        metrics = dict(r.metrics or {})
        trial_id = metrics.get("trial_id") or Path(r.path).name.removeprefix("trial-")  # see trial_dirname
        frame = getattr(r, "metrics_dataframe", None)
        saved = frame.to_dict("records") if frame is not None else []
        status = "TERMINATED" if metrics.get("done") else "PAUSED"
        records.append(
            {
                "trial_id": trial_id,
                "combo": r.config["trial"],
                "status": "ERROR" if r.error else status,
                "error": _error_line(r.error),
                "history": merge(read_history(sweep_dir, trial_id) if sweep_dir else [], [*saved, metrics], metric),
            }
        )
    return records


def outcome(rec: dict, steps_wanted: int, metric: str) -> tuple[str, str]:
    """(status, reason) of a trial for the table: completed, stopped (by ASHA), failed, or Tune's own status
    (paused, running, pending) for a trial the sweep has not ended."""
    steps = max((int(r["step"]) for r in rec["history"]), default=0)
    if rec["status"] == "ERROR":
        return "failed", rec.get("error") or "failed"
    if steps >= steps_wanted:  # reached its last step, even when Ctrl-C came before Tune recorded it done
        return "completed", "completed"
    if rec["status"] == "TERMINATED":  # ended before its last step without a failure: ASHA stopped it at a rung
        seen = [r for r in rec["history"] if metric in r]
        return "stopped", (
            f"ASHA at step {seen[-1]['step']} ({metric} {seen[-1][metric]:.4g})" if seen else "stopped early"
        )
    return rec["status"].lower(), ""


def trial_rows(cfg, records: list[dict]) -> tuple[list[dict], dict]:
    """One table row per trial record, and each trial's curve of tune.metric."""
    metric, rows, curves = cfg.tune.metric, [], {}
    pick = min if metric_mode(cfg) == "min" else max
    for rec in records:
        combo, tid, history = rec["combo"], rec["trial_id"], rec["history"]
        status, reason = outcome(rec, cfg.tune.steps, metric)
        curve = [(int(r["step"]), float(r[metric])) for r in history if metric in r]
        trained = [v for s, v in curve if s > 0 and math.isfinite(v)]  # step 0 would score the untrained G
        final = {k: next((r[k] for r in reversed(history) if k in r), None) for k in SCORES}
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
                "steps": max((int(r["step"]) for r in history), default=0),
                "stop_reason": reason,
                "best": pick(trained) if trained else None,
                "final_fid": final["loop/fid"],
                "final_is": final["loop/is"],
                "final_class_acc": final["loop/class_acc"],
                "wall_s": round(float(history[-1].get("time_total_s", 0.0)), 1) if history else 0.0,
            }
        )
        curves[f"{tid}: ratio {combo['ratio']:g}, attention {placement_label(combo['g_attn'], combo['d_attn'])}"] = (
            curve
        )
    return rows, curves


def best_row(rows: list[dict], mode: str) -> dict | None:
    """The trial with the best score, among those that did not fail (a diverged config is no recommendation)."""
    scored = [r for r in rows if r["best"] is not None and r["status"] != "failed"]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda r: r["best"])


def placement_label(g: list, d: list) -> str:
    """ "16" when G and D share sizes [16], "none" for [], "G16 D32" when they differ."""

    def sizes(a):
        return "+".join(map(str, a)) or "none"

    return sizes(g) if list(g) == list(d) else f"G{sizes(g)} D{sizes(d)}"
