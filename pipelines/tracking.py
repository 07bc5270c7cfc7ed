"""MLflow logging that never stops training.

Rank 0 hands every metric, tag and image to an `Outbox`: a daemon thread delivers them in order, each
request bounded in time. While the tracking store is down the items wait in memory (and past a bound, on
disk) and training goes on; whatever the store has not taken when the run ends is written to
`<run dir>/mlflow-pending/<run id>.jsonl` (images as PNG files beside it), which the next launch of the
run, or `python pipelines/replay_tracking.py RUN_DIR`, delivers. Metrics keep the time they were taken.
"""

import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("sagan.tracking")
PENDING_DIR = "mlflow-pending"
MAX_QUEUED = 20_000  # items held in memory during an outage; beyond, they go to the pending file at once
# Bounded requests: MLflow's defaults (7 retries, 120 s timeout) would hold a flush for many minutes.
REQUEST_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # fmt: skip


def bound_requests() -> None:
    """Give MLflow's HTTP client short timeouts and few retries in this process, unless the user set them."""
    for k, v in REQUEST_ENV.items():
        os.environ.setdefault(k, v)


def pending_dir(storage_path: str, run_name: str) -> Path:
    """Where undelivered items of a run wait: under the run directory, or a local cache for remote storage."""
    if "://" in storage_path:
        return Path.home() / ".cache" / "sagan" / PENDING_DIR / run_name
    return Path(storage_path) / run_name / PENDING_DIR


def deliver(client, run_id: str, item: dict) -> None:
    """Send one item to the store; raises whatever the client raises."""
    from mlflow.entities import Metric

    kind = item["kind"]
    if kind == "metrics":
        metrics = [Metric(k, float(v), item["timestamp"], item["step"]) for k, v in item["values"].items()]
        client.log_batch(run_id, metrics=metrics)
    elif kind == "tags":
        for k, v in item["values"].items():
            client.set_tag(run_id, k, v)
    elif kind == "image":
        client.log_image(run_id, item["array"], key=item["key"], step=item["step"], timestamp=item["timestamp"])
    elif kind == "artifact_image":
        client.log_image(run_id, item["array"], artifact_file=item["artifact_file"])
    elif kind == "curve":
        from sagan.viz import metric_curve

        history = client.get_metric_history(run_id, item["metric"])
        # A resumed run replays the steps after its last checkpoint: the latest value of each step counts.
        latest = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
        if latest:
            client.log_image(run_id, metric_curve(sorted(latest.items()), item["metric"]),
                             artifact_file=item["artifact_file"])  # fmt: skip
    elif kind == "terminate":
        client.set_terminated(run_id, item["status"])
    else:
        raise ValueError(f"unknown tracking item kind {kind!r}")


class Outbox:
    """Queue MLflow items for run `run_id` and deliver them from a background thread, in order.

    No call blocks the caller. A failed delivery is retried with backoff (1 s doubling to `max_backoff`);
    one warning says the store went away, one says it came back.
    """

    def __init__(self, tracking_uri: str, run_id: str, spill_to: Path, max_backoff: float = 30.0):
        import mlflow

        bound_requests()
        self.client = mlflow.MlflowClient(tracking_uri)
        self.uri, self.run_id, self.spill_to = tracking_uri, run_id, Path(spill_to)
        self.max_backoff = max_backoff
        self.items: deque = deque()
        self.cond = threading.Condition()
        self.closing = False
        self.down_since: float | None = None
        self.spilled = 0
        self.thread = threading.Thread(target=self._run, name="mlflow-outbox", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------- what the training loop calls

    def metrics(self, values: dict, step: int) -> None:
        self._put({"kind": "metrics", "values": {k: float(v) for k, v in values.items()}, "step": int(step),
                   "timestamp": int(time.time() * 1000)})  # fmt: skip

    def tags(self, values: dict) -> None:
        self._put({"kind": "tags", "values": {k: str(v) for k, v in values.items()}})

    def image(self, array: np.ndarray, key: str, step: int) -> None:
        self._put({"kind": "image", "array": array, "key": key, "step": int(step), "timestamp": int(time.time() * 1000)})

    def artifact_image(self, array: np.ndarray, artifact_file: str) -> None:
        self._put({"kind": "artifact_image", "array": array, "artifact_file": artifact_file})

    def curve(self, metric: str, artifact_file: str) -> None:
        """A plot of the run's whole history of `metric`, made when the store has every point before it."""
        self._put({"kind": "curve", "metric": metric, "artifact_file": artifact_file})

    def terminate(self, status: str) -> None:
        """End the run with `status` (FINISHED, FAILED, KILLED) once everything before it is delivered."""
        self._put({"kind": "terminate", "status": status})

    def close(self, timeout: float = 30.0) -> int:
        """Deliver what is queued for up to `timeout` seconds, then write the rest to the pending file;
        returns how many items are pending (0: the store has everything)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            self.closing = True
            self.cond.notify_all()
            while self.items and time.monotonic() < deadline:
                self.cond.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            left = list(self.items)
            self.items.clear()
        if left:
            spill(self.spill_to, self.uri, self.run_id, left)
        pending = self.spilled + len(left)
        if pending:
            log.warning(f"MLflow at {self.uri} did not take {pending} item(s) of run {self.run_id}; they are kept "
                        f"in {self.spill_to} and delivered by the next launch of this run or by "
                        f"`python pipelines/replay_tracking.py {self.spill_to.parent}`")  # fmt: skip
        return pending

    # ------------------------------------------------------------- the delivery thread

    def _put(self, item: dict) -> None:
        with self.cond:
            if len(self.items) >= MAX_QUEUED:  # a long outage: the oldest go to disk, memory stays bounded
                spill(self.spill_to, self.uri, self.run_id, [self.items.popleft() for _ in range(MAX_QUEUED // 2)])
                self.spilled += MAX_QUEUED // 2
            self.items.append(item)
            self.cond.notify_all()

    def _run(self) -> None:
        backoff = 1.0
        while True:
            with self.cond:
                while not self.items:
                    self.cond.wait()
                item = self.items[0]
            try:
                deliver(self.client, self.run_id, item)
            except Exception as e:  # noqa: BLE001 - any failure of the store: keep the item, retry later
                if item["kind"] == "curve" and "RESOURCE_DOES_NOT_EXIST" in str(e):
                    self._pop(item)  # nothing logged under that metric: no plot to make
                    continue
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    log.warning(f"MLflow at {self.uri} is not reachable ({_first_line(e)}); training goes on and "
                                "the metrics, tags and images wait until it is back")  # fmt: skip
                with self.cond:  # wake early on close; close then gives up on what is left
                    self.cond.wait(timeout=backoff if not self.closing else 0.5)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            self._pop(item)
            backoff = 1.0
            if self.down_since is not None:
                log.warning(f"MLflow at {self.uri} is back after {time.monotonic() - self.down_since:.0f} s; "
                            f"delivering the {len(self.items)} waiting item(s)")  # fmt: skip
                self.down_since = None

    def _pop(self, item: dict) -> None:
        with self.cond:
            if self.items and self.items[0] is item:
                self.items.popleft()
            self.cond.notify_all()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


# ---------------------------------------------------------------- the driver's side: one MLflow run per run.name


def find_run(client, experiment_id: str, newest: bool = False, **tags) -> str | None:
    """The id of the run in the experiment carrying all of `tags` (the oldest, or the newest), or None."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    order = "DESC" if newest else "ASC"
    runs = client.search_runs([experiment_id], query, order_by=[f"attributes.start_time {order}"], max_results=1)
    return runs[0].info.run_id if runs else None


def log_params(client, run_id: str, params: dict) -> None:
    """Log `params` (values as strings, at most 6000 characters) in batches of 100, MLflow's limit."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def open_run(tracking_uri: str, experiment_id: str, run_name: str, location: str, params: dict, tags: dict) -> str:
    """The MLflow run of the training run at `location` (storage/run.name), made by the driver before any
    worker starts, so a retry after a worker failure logs into the same run. A relaunch of an existing run
    directory continues its run (status RUNNING again); otherwise a new run with `params` and `tags`."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    tags = {"checkpoint_location": location, **{k: str(v) for k, v in tags.items() if v}}
    resuming = "://" in location or (Path(location).is_dir() and any(Path(location).glob("checkpoint_*")))
    found = find_run(client, experiment_id, newest=True, checkpoint_location=location) if resuming else None
    if found:
        client.update_run(found, status="RUNNING")
        for k in ("ray_job_id", "git_commit"):  # this launch's
            if k in tags:
                client.set_tag(found, k, tags[k])
        return found
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def end_run(tracking_uri: str, run_id: str, status: str, spill_to: Path) -> None:
    """Set the run's status now, or, with the store out of reach, leave it in the pending file for replay."""
    import mlflow

    bound_requests()
    try:
        mlflow.MlflowClient(tracking_uri).set_terminated(run_id, status)
    except Exception as e:  # noqa: BLE001 - the run's outcome stands; its record follows when the store is back
        spill(spill_to, tracking_uri, run_id, [{"kind": "terminate", "status": status}])
        log.warning(f"MLflow at {tracking_uri} did not take status {status} of run {run_id} ({_first_line(e)}); "
                    f"kept in {spill_to}")  # fmt: skip


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


def replay(folder: Path, tracking_uri: str | None = None) -> tuple[int, int]:
    """Deliver every pending file in `folder` in order; returns (delivered, still pending). A file is
    removed once all its items are in the store; on a failure the undelivered rest is kept for next time."""
    import mlflow

    bound_requests()
    delivered = left = 0
    for path in sorted(Path(folder).glob("*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        done = 0
        for item in lines:
            client = mlflow.MlflowClient(tracking_uri or item["tracking_uri"])
            if "png" in item:
                item["array"] = np.asarray(Image.open(path.parent / item["png"]).convert("RGB"))
            try:
                deliver(client, item["run_id"], item)
            except Exception as e:  # noqa: BLE001
                if item["kind"] == "curve" and "RESOURCE_DOES_NOT_EXIST" in str(e):
                    done += 1
                    continue
                log.warning(f"replay of {path} stopped at item {done + 1} of {len(lines)}: {_first_line(e)}")
                break
            done += 1
        rest = lines[done:]
        for item in lines[:done]:
            if "png" in item:
                (path.parent / item["png"]).unlink(missing_ok=True)
        if rest:
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps({k: v for k, v in i.items() if k != "array"}) + "\n" for i in rest))
            os.replace(tmp, path)
        else:
            path.unlink()
        delivered, left = delivered + done, left + len(rest)
    if not left and Path(folder).is_dir() and not any(Path(folder).glob("*.jsonl")):
        for png in Path(folder).glob("*.png"):  # left by a spill cut short
            png.unlink()
        Path(folder).rmdir()
    return delivered, left
