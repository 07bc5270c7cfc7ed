"""Tracking items the store had not taken: written to `<run dir>/mlflow-pending/<run id>.jsonl` (images as PNG
files beside it), replayed in order later; items the store refuses for good are set aside with a warning.

MLflow is imported inside the functions that talk to the store, not at the top: train.py and tune.py import
this module before their checks, which refuse a bad launch without paying MLflow's import (about a second or
more; benchmarks/import_times.py).
"""

import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from pipelines.tracking.delivery import bound_requests, brief_error, deliver, permanent

log = logging.getLogger("sagan.tracking")


def reject(folder: Path, uri: str, run_id: str, item: dict, error: BaseException, by_store: bool = True) -> None:
    """Set aside an item the store refused, or (`by_store` False) a pending line that cannot be read: one
    warning, and a line in <folder>/rejected-<run_id>.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in item.items() if k not in ("array", "png")}
    with open(folder / f"rejected-{run_id}.txt", "a") as f:
        f.write(json.dumps({"error": brief_error(error), **record}) + "\n")
    what = (
        f"MLflow at {uri} refused a {item.get('kind')} item of run {run_id}"
        if by_store
        else f"a pending {item.get('kind') or 'line'} of run {run_id} cannot be read (cut short by a crash, or its "
        "image lost?)"
    )
    log.warning(f"{what} ({brief_error(error)}); set aside in {folder / f'rejected-{run_id}.txt'}")


def deliver_pending(pending: Path, uri: str, whose: str, shown: str | None = None) -> None:
    """Deliver the MLflow items waiting in `pending` (a spill of an outage); a warning, never an error. `shown`:
    where the messages say the items wait (default `pending`)."""
    if not pending.is_dir():
        return
    try:
        delivered, _, left = replay(pending)
    except Exception as e:  # noqa: BLE001 - tracking must not stop a launch
        delivered, left = 0, f"some ({type(e).__name__}: {brief_error(e)})"
    shown = shown or str(pending)
    if delivered:
        print(f"MLflow: delivered {delivered} item(s) {whose} in {shown}", flush=True)
    if left:
        print(
            f"warning: MLflow at {uri} has not taken {left} item(s) kept in {shown}; the next launch of this "
            f"run or `python pipelines/replay_tracking.py {shown}` delivers them",
            file=sys.stderr,
        )


# ---------------------------------------------------------------- pending files: written, then replayed


def spill(folder: Path, uri: str, run_id: str, items: list[dict]) -> Path:
    """Append `items` to `<folder>/<run_id>.jsonl` (images as PNG files beside it); returns the file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run_id}.jsonl"
    with open(path, "a") as f:
        for item in items:
            item = dict(item, tracking_uri=uri, run_id=run_id)
            if "array" in item:
                png = folder / f"{run_id}-{time.time_ns()}.png"
                tmp = png.with_suffix(".png.tmp")
                Image.fromarray(np.asarray(item.pop("array"))).save(tmp, format="PNG")
                os.replace(tmp, png)
                item["png"] = png.name
            f.write(json.dumps(item) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


class Replayed(NamedTuple):
    delivered: int  # items the store took
    set_aside: int  # unreadable lines and items the store refused, in rejected-<run id>.txt
    left: int  # items still pending: the store was out of reach


def replay(folder: Path, tracking_uri: str | None = None) -> Replayed:
    """Deliver every pending file in `folder` in order. A file is removed once all its items are in the store
    or set aside; when the store is out of reach the undelivered rest is kept for next time. Lines that cannot
    be read (a spill cut short) and items the store refuses are set aside."""
    import mlflow  # lazy: see the module docstring

    bound_requests()
    folder, delivered, set_aside, left = Path(folder), 0, 0, 0
    for path in sorted(p for p in folder.glob("*.jsonl") if not p.name.startswith(".")):  # not a write cut short
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        done = aside = 0
        for line in lines:
            item = {}
            try:
                item = json.loads(line)
                if "png" in item:
                    item["array"] = np.asarray(Image.open(folder / item["png"]).convert("RGB"))
            except (ValueError, OSError) as e:  # a line cut short by a crash, an image lost: unusable, set aside
                kind = item.get("kind") if isinstance(item, dict) else None
                reject(folder, tracking_uri or "?", path.stem, {"kind": kind, "line": line[:2000]}, e, by_store=False)
                done, aside = done + 1, aside + 1
                continue
            try:
                deliver(mlflow.MlflowClient(tracking_uri or item["tracking_uri"]), item["run_id"], item)
            except Exception as e:  # noqa: BLE001 - sorted below: the store is away, or this item is refused
                if not (permanent(e) or isinstance(e, KeyError)):  # the store is away
                    log.warning(f"replay of {path} stopped at item {done + 1} of {len(lines)}: {brief_error(e)}")
                    break
                reject(folder, tracking_uri or "?", path.stem, {"kind": item.get("kind"), "line": line[:2000]}, e)
                aside += 1
            done += 1
        rest = lines[done:]
        for line in lines[:done]:
            png = re.search(r'"png": "([^"]+)"', line)
            if png:
                (folder / png.group(1)).unlink(missing_ok=True)
        if rest:
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in rest))
            os.replace(tmp, path)
        else:
            path.unlink()
        delivered, set_aside, left = delivered + done - aside, set_aside + aside, left + len(rest)
    if not left and folder.is_dir() and not any(folder.glob("*.jsonl")):
        for leftover in [*folder.glob("*.png"), *folder.glob("*.tmp")]:  # from a spill cut short
            leftover.unlink()
        if not any(folder.iterdir()):  # a rejected-*.txt stays for the user to read
            folder.rmdir()
    return Replayed(delivered, set_aside, left)
