"""One tracking item delivered to MLflow, with bounded requests, and whether a failure is the store refusing it
for good or being out of reach.

MLflow is imported inside the functions that talk to the store, not at the top: train.py and tune.py import
this module before their checks, which refuse a bad launch without paying MLflow's import (about a second or
more; benchmarks/import_times.py).
"""

import json
import os

# Bounded requests: MLflow's defaults (7 retries, 120 s timeout) would hold a flush for many minutes.
REQUEST_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def bound_requests(max_retries: int = 1) -> None:
    """Give MLflow's HTTP client a short timeout and `max_retries` retries in this process, unless the user
    set them. The Outbox's process takes 0: the Outbox retries by itself, with its own backoff."""
    for k, v in {**REQUEST_ENV, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries)}.items():
        os.environ.setdefault(k, v)


def deliver(client, run_id: str, item: dict) -> None:
    """Send one item to the store; raises whatever the client raises."""
    from mlflow.entities import Metric, RunTag  # lazy: see the module docstring

    kind = item["kind"]
    if kind == "metrics":
        metrics = [Metric(k, float(v), item["timestamp"], item["step"]) for k, v in item["values"].items()]
        client.log_batch(run_id, metrics=metrics)
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in item["values"].items()])  # one request for all
    elif kind == "image":
        client.log_image(run_id, item["array"], key=item["key"], step=item["step"], timestamp=item["timestamp"])
    elif kind == "curve":
        from sagan.viz import metric_curve  # lazy: matplotlib loads for a curve, not in every logging process

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


def permanent(error: BaseException) -> bool:
    """Whether the store refused an item for good (a 400 or 404-like answer to the request itself, a value MLflow
    cannot take) rather than being out of reach (no answer, a 5xx, a rate limit, a proxy in the way)."""
    from mlflow.exceptions import MlflowException  # lazy: see the module docstring

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


def brief_error(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
