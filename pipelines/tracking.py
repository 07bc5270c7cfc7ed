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
import re
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("sagan.tracking")
PENDING_DIR = "mlflow-pending"
MAX_QUEUED = 20_000  # items held in memory during an outage; beyond, the oldest half goes to the pending file
MAX_QUEUED_BYTES = 512 * 2**20  # the same for the images' bytes
# Bounded requests: MLflow's defaults (7 retries, 120 s timeout) would hold a flush for many minutes.
REQUEST_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def bound_requests(max_retries: int = 1) -> None:
    """Give MLflow's HTTP client a short timeout and `max_retries` retries in this process, unless the user
    set them. The Outbox's process takes 0: the Outbox retries by itself, with its own backoff."""
    for k, v in {**REQUEST_ENV, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries)}.items():
        os.environ.setdefault(k, v)


def pending_dir(storage_path: str, run_name: str) -> Path:
    """Where undelivered items of a run wait: under the run directory, or a local cache for remote storage."""
    if "://" in storage_path:
        return Path.home() / ".cache" / "sagan" / PENDING_DIR / run_name
    return Path(storage_path) / run_name / PENDING_DIR


def deliver(client, run_id: str, item: dict) -> None:
    """Send one item to the store; raises whatever the client raises."""
    from mlflow.entities import Metric, RunTag

    kind = item["kind"]
    if kind == "metrics":
        metrics = [Metric(k, float(v), item["timestamp"], item["step"]) for k, v in item["values"].items()]
        client.log_batch(run_id, metrics=metrics)
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in item["values"].items()])  # one request for all
    elif kind == "image":
        client.log_image(run_id, item["array"], key=item["key"], step=item["step"], timestamp=item["timestamp"])
    elif kind == "curve":
        from sagan.viz import metric_curve

        history = client.get_metric_history(run_id, item["metric"])
        # A resumed run replays the steps after its last checkpoint: the latest value of each step counts.
        latest = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
        if latest:
            client.log_image(
                run_id, metric_curve(sorted(latest.items()), item["metric"]), artifact_file=item["artifact_file"]
            )
    elif kind == "terminate":
        client.set_terminated(run_id, item["status"])
    else:
        raise ValueError(f"unknown tracking item kind {kind!r}")


class Outbox:
    """Queue MLflow items for run `run_id` and deliver them from a background thread, in order.

    No call blocks the caller. A delivery that fails for want of the store is retried with backoff (1 s,
    doubling to `max_backoff`); one warning says the store went away, one says it came back. An item the
    store refuses for good (a deleted run, a value over MLflow's limits) is set aside in the pending folder's
    rejected file with one warning, so it cannot hold up the ones behind it.
    """

    def __init__(self, tracking_uri: str, run_id: str, spill_to: Path, max_backoff: float = 30.0):
        import mlflow

        bound_requests(max_retries=0)
        self.client = mlflow.MlflowClient(tracking_uri)
        self.uri, self.run_id, self.spill_to = tracking_uri, run_id, Path(spill_to)
        self.max_backoff = max_backoff
        self.items: deque = deque()
        self.queued_bytes = 0  # of the images waiting: a long outage must not fill rank 0's memory
        self.cond = threading.Condition()
        self.closing = False
        self.inflight: dict | None = None  # the item being sent: never spilled while a request may still land
        self.down_since: float | None = None
        self.retry_at = 0.0  # no delivery before this time (monotonic): the backoff after a failure
        self.spilled = 0
        self.spill_lock = threading.Lock()  # the training thread (persist, close) and this one both append
        self.thread = threading.Thread(target=self._run, name="mlflow-outbox", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------- what the training loop calls

    def metrics(self, values: dict, step: int) -> None:
        self._put(
            {
                "kind": "metrics",
                "values": {k: float(v) for k, v in values.items()},
                "step": int(step),
                "timestamp": int(time.time() * 1000),
            }
        )

    def tags(self, values: dict) -> None:
        self._put({"kind": "tags", "values": {k: str(v) for k, v in values.items()}})

    def image(self, array: np.ndarray, key: str, step: int) -> None:
        self._put(
            {"kind": "image", "array": array, "key": key, "step": int(step), "timestamp": int(time.time() * 1000)}
        )

    def curve(self, metric: str, artifact_file: str) -> None:
        """A plot of the run's whole history of `metric`, made when the store has every point before it."""
        self._put({"kind": "curve", "metric": metric, "artifact_file": artifact_file})

    def terminate(self, status: str) -> None:
        """End the run with `status` (FINISHED, FAILED, KILLED) once everything before it is delivered."""
        self._put({"kind": "terminate", "status": status})

    def persist(self) -> int:
        """During an outage, write what waits (but the item in flight) to the pending file now; the number
        written. Called at checkpoints: Ray may kill this process (a failed rank) before close() runs."""
        with self.cond:
            if self.down_since is None:
                return 0
            waiting = [i for i in self.items if i is not self.inflight]
            self._forget(waiting)
        self._spill(waiting)
        return len(waiting)

    def close(self, timeout: float = 30.0) -> int:
        """Deliver what is queued for up to `timeout` seconds, then write the rest to the pending file;
        returns how many items went there in all (0: the store has everything)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            self.closing = True
            self.retry_at = min(self.retry_at, time.monotonic() + 0.5)  # the last chances come quickly
            self.cond.notify_all()
            while self.items and time.monotonic() < deadline:
                self.cond.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            while self.inflight is not None and time.monotonic() < deadline + 15:  # a request's own timeout
                self.cond.wait(timeout=1.0)
            left = [i for i in self.items if i is not self.inflight]  # a request still out may yet land
            self._forget(left)
        self._spill(left)
        pending = self.spilled
        if pending:
            where = f"{self.spill_to}" + (" on this node" if self.spill_to.is_relative_to(Path.home()) else "")
            log.warning(
                f"MLflow at {self.uri} did not take {pending} item(s) of run {self.run_id}; they are kept "
                f"in {where} and delivered by the next launch of this run or by "
                f"`python pipelines/replay_tracking.py {self.spill_to}`"
            )
        return pending

    # ------------------------------------------------------------- the delivery thread

    def _put(self, item: dict) -> None:
        with self.cond:
            self.items.append(item)
            self.queued_bytes += _nbytes(item)
            self.cond.notify_all()

    def _forget(self, items: list[dict]) -> None:
        """Take `items` off the queue (the caller holds the lock)."""
        gone = {id(i) for i in items}
        self.items = deque(i for i in self.items if id(i) not in gone)
        self.queued_bytes -= sum(_nbytes(i) for i in items)

    def _run(self) -> None:
        backoff = 1.0
        while True:
            with self.cond:
                while not self.items or time.monotonic() < self.retry_at:
                    self.cond.wait(timeout=max(0.0, self.retry_at - time.monotonic()) if self.items else None)
                item = self.inflight = self.items[0]
            try:
                deliver(self.client, self.run_id, item)
                failure = None
            except Exception as e:  # noqa: BLE001 - sorted below: the store is away, or refuses this item
                failure = e
            try:
                backoff = self._settle(item, failure, backoff)
            except Exception as e:  # noqa: BLE001 - a full disk while setting aside: keep delivering, say so once
                log.warning(f"MLflow outbox: {type(e).__name__}: {_first_line(e)}")
                with self.cond:
                    self.inflight = None
                    self.retry_at = time.monotonic() + backoff

    def _settle(self, item: dict, failure: Exception | None, backoff: float) -> float:
        """After one delivery attempt: pop the item (delivered, or refused for good and set aside) or schedule
        the retry; returns the next backoff."""
        refused = failure is not None and permanent(failure)
        with self.cond:
            self.inflight = None
            if failure is None or refused:
                if self.items and self.items[0] is item:
                    self.items.popleft()
                    self.queued_bytes -= _nbytes(item)
                self.cond.notify_all()
            else:
                self.retry_at = time.monotonic() + (backoff if not self.closing else 0.5)
            was_down, self.down_since = (
                self.down_since,
                (None if failure is None else self.down_since or (None if refused else time.monotonic())),
            )
            waiting = len(self.items)
        if refused:
            reject(self.spill_to, self.uri, self.run_id, item, failure)
            return backoff
        if failure is not None:
            if was_down is None:
                log.warning(
                    f"MLflow at {self.uri} is not reachable ({_first_line(failure)}); training goes on "
                    "and the metrics, tags and images wait until it is back"
                )
            self._spill_overflow()
            return min(backoff * 2, self.max_backoff)
        if was_down is not None:
            log.warning(
                f"MLflow at {self.uri} is back after {time.monotonic() - was_down:.0f} s; delivering the "
                f"{waiting} waiting item(s)"
            )
        return 1.0

    def _spill_overflow(self) -> None:
        """A long outage: the oldest half of the queue goes to the pending file, so memory stays bounded."""
        with self.cond:
            if len(self.items) <= MAX_QUEUED and self.queued_bytes <= MAX_QUEUED_BYTES:
                return
            oldest = [i for i in list(self.items)[: max(1, len(self.items) // 2)] if i is not self.inflight]
            self._forget(oldest)
        self._spill(oldest)

    def _spill(self, items: list[dict]) -> None:
        if items:
            with self.spill_lock:
                spill(self.spill_to, self.uri, self.run_id, items)
                self.spilled += len(items)


def _nbytes(item: dict) -> int:
    return int(getattr(item.get("array"), "nbytes", 0))


def permanent(error: BaseException) -> bool:
    """Whether the store refused an item for good (a 400 or 404-like answer to the request itself, a value MLflow
    cannot take) rather than being out of reach (no answer, a 5xx, a rate limit, a proxy in the way)."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        transient = (
            "REQUEST_LIMIT_EXCEEDED",
            "RESOURCE_EXHAUSTED",
            "ABORTED",
            "UNAUTHENTICATED",
            "PERMISSION_DENIED",
            "TEMPORARILY_UNAVAILABLE",
            "ENDPOINT_NOT_FOUND",
        )
        return 400 <= status < 500 and status not in (401, 403, 408, 409, 429) and error.error_code not in transient
    return isinstance(error, (ValueError, TypeError)) and not isinstance(error, json.JSONDecodeError)


def reject(folder: Path, uri: str, run_id: str, item: dict, error: BaseException) -> None:
    """Set aside an item the store refused: one warning, and a line in <folder>/rejected-<run_id>.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in item.items() if k not in ("array", "png")}
    with open(folder / f"rejected-{run_id}.txt", "a") as f:
        f.write(json.dumps({"error": _first_line(error), **record}) + "\n")
    log.warning(
        f"MLflow at {uri} refused a {item.get('kind')} item of run {run_id} ({_first_line(error)}); set "
        f"aside in {folder / f'rejected-{run_id}.txt'}"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


# ---------------------------------------------------------------- the driver's side: one MLflow run per run.name


def find_run(client, experiment_id: str, newest: bool = False, **tags) -> str | None:
    """The id of the run in the experiment carrying all of `tags` (the oldest, or the newest), or None."""
    quoted = {k: str(v).replace("\\", "\\\\").replace("'", "\\'") for k, v in tags.items()}
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in quoted.items())
    order = "DESC" if newest else "ASC"
    runs = client.search_runs([experiment_id], query, order_by=[f"attributes.start_time {order}"], max_results=1)
    return runs[0].info.run_id if runs else None


def log_params(client, run_id: str, params: dict) -> None:
    """Log `params` (values as strings, at most 6000 characters) in batches of 100, MLflow's limit."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def open_run(
    tracking_uri: str, experiment_id: str, run_name: str, location: str, params: dict, tags: dict, continuing: bool
) -> str:
    """The MLflow run of the training run at `location` (storage/run.name), made by the driver before any
    worker starts, so a retry after a worker failure logs into the same run. A run that resumes from a
    checkpoint (`continuing`) continues the newest MLflow run of that location (status RUNNING again);
    otherwise a new run with `params` and `tags`."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    tags = {"checkpoint_location": location, **{k: str(v) for k, v in tags.items() if v}}
    found = find_run(client, experiment_id, newest=True, checkpoint_location=location) if continuing else None
    if found:
        client.update_run(found, status="RUNNING")
        for k in ("ray_job_id", "git_commit"):  # this launch's
            if k in tags:
                client.set_tag(found, k, tags[k])
        return found
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def deliver_pending(pending: Path, uri: str, whose: str) -> None:
    """Deliver the MLflow items waiting in `pending` (a spill of an outage); a warning, never an error."""
    if not pending.is_dir():
        return
    try:
        delivered, left = replay(pending)
    except Exception as e:  # noqa: BLE001 - tracking must not stop a launch
        delivered, left = 0, f"some ({type(e).__name__}: {_first_line(e)})"
    if delivered:
        print(f"MLflow: delivered {delivered} item(s) {whose} in {pending}", flush=True)
    if left:
        print(
            f"warning: MLflow at {uri} has not taken {left} item(s) kept in {pending}; the next launch of this "
            f"run or `python pipelines/replay_tracking.py {pending}` delivers them",
            file=sys.stderr,
        )


def end_run(tracking_uri: str, run_id: str, status: str, spill_to: Path) -> None:
    """Set the run's status now, or, with the store out of reach, leave it in the pending file for replay."""
    import mlflow

    bound_requests()
    try:
        mlflow.MlflowClient(tracking_uri).set_terminated(run_id, status)
    except Exception as e:  # noqa: BLE001 - the run's outcome stands; its record follows when the store is back
        spill(spill_to, tracking_uri, run_id, [{"kind": "terminate", "status": status}])
        log.warning(
            f"MLflow at {tracking_uri} did not take status {status} of run {run_id} ({_first_line(e)}); "
            f"kept in {spill_to}"
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


def replay(folder: Path, tracking_uri: str | None = None) -> tuple[int, int]:
    """Deliver every pending file in `folder` in order; returns (delivered, still pending). A file is
    removed once all its items are in the store; when the store is out of reach the undelivered rest is kept
    for next time. Lines that cannot be read (a spill cut short) and items the store refuses are set aside."""
    import mlflow

    bound_requests()
    folder, delivered, left = Path(folder), 0, 0
    for path in sorted(folder.glob("*.jsonl")):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        done = 0
        for line in lines:
            try:
                item = json.loads(line)
                if "png" in item:
                    item["array"] = np.asarray(Image.open(folder / item["png"]).convert("RGB"))
            except (ValueError, OSError) as e:  # a line cut short by a crash, an image lost: unusable, set aside
                reject(folder, tracking_uri or "?", path.stem, {"line": line[:2000]}, e)
                done += 1
                continue
            try:
                deliver(mlflow.MlflowClient(tracking_uri or item["tracking_uri"]), item["run_id"], item)
            except Exception as e:  # noqa: BLE001 - sorted below: the store is away, or this item is refused
                if not (permanent(e) or isinstance(e, KeyError)):  # the store is away
                    log.warning(f"replay of {path} stopped at item {done + 1} of {len(lines)}: {_first_line(e)}")
                    break
                reject(folder, tracking_uri or "?", path.stem, {"line": line[:2000]}, e)
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
        delivered, left = delivered + done, left + len(rest)
    if not left and folder.is_dir() and not any(folder.glob("*.jsonl")):
        for leftover in [*folder.glob("*.png"), *folder.glob("*.tmp")]:  # from a spill cut short
            leftover.unlink()
        if not any(folder.iterdir()):  # a rejected-*.txt stays for the user to read
            folder.rmdir()
    return delivered, left
