"""MLflow logging that never stops training.

Rank 0 hands every metric, tag and image to an `Outbox`: a daemon thread delivers them in order, each
request bounded in time. While the tracking store is down the items wait in memory (and past a bound, on
disk) and training goes on; whatever the store has not taken when the run ends is written to the run's
pending folder (tracking.pending), which the next launch of the run, or `python pipelines/replay_tracking.py
RUN_DIR`, delivers. Metrics keep the time they were taken.
"""

import logging
import threading
import time
from collections import deque
from pathlib import Path

import mlflow
import numpy as np

from pipelines.tracking.delivery import bound_requests, brief_error, deliver, permanent
from pipelines.tracking.pending import reject, spill

log = logging.getLogger("sagan.tracking")


MAX_QUEUED = 20_000  # items held in memory during an outage; beyond, the oldest half goes to the pending file


MAX_QUEUED_BYTES = 512 * 2**20  # the same for the images' bytes


class Outbox:
    """Queue MLflow items for run `run_id` and deliver them from a background thread, in order.

    No call blocks the caller. A delivery that fails for want of the store is retried with backoff (1 s,
    doubling to `max_backoff`); one warning says the store went away, one says it came back. An item the
    store refuses for good (a deleted run, a value over MLflow's limits) is set aside in the pending folder's
    rejected file with one warning, so it cannot hold up the ones behind it.
    """

    def __init__(
        self, tracking_uri: str, run_id: str, spill_to: Path, max_backoff: float = 30.0, shown: str | None = None
    ):
        bound_requests(max_retries=0)
        self.client = mlflow.MlflowClient(tracking_uri)
        self.uri, self.run_id, self.spill_to = tracking_uri, run_id, Path(spill_to)
        self.shown = shown  # where the spilled items end up, when not in spill_to (a run on object storage)
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
            shown = self.shown or str(self.spill_to)
            where = shown + (" on this node" if not self.shown and self.spill_to.is_relative_to(Path.home()) else "")
            log.warning(
                f"MLflow at {self.uri} did not take {pending} item(s) of run {self.run_id}; they are kept "
                f"in {where} and delivered by the next launch of this run or by "
                f"`python pipelines/replay_tracking.py {shown}`"
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
                log.warning(f"MLflow outbox: {type(e).__name__}: {brief_error(e)}")
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
                    f"MLflow at {self.uri} is not reachable ({brief_error(failure)}); training goes on "
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
