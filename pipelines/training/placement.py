"""Placing a run's workers, with a bounded wait, and the one line that says what is missing when they cannot be.

Ray Train retries a worker group that did not start (its controller's startup timeout, 60 s) without limit by
default (FailureConfig.controller_failure_limit=-1): a node lost under STRICT_SPREAD, or a placement group that a
stopped sweep trial leaked (ray-project/ray#54305, #61756, #65447), leaves the job RUNNING forever. Here each
attempt waits at most ATTEMPT_S and the attempts are limited so that the whole wait is scaling.placement_timeout_s;
a node that comes back within it lets the run go on.
"""

import math
import os
from contextlib import contextmanager

from sagan.errors import JobFailed, UsageError

ATTEMPT_S = 60.0  # Ray Train's own default startup timeout
# An elastic run's group size comes from Ray's view of the free resources, which lags a lost node by seconds: a
# group sized on it waits for a placement that never comes. Measured on the local cluster: 60 s lost so, after a
# node was killed (tests/test_multinode.py). Only the placement wait is bounded, not the workers' start.
ELASTIC_ATTEMPT_S = 10.0
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # read by the controller (Train propagates it)


class PlacementTimeout(JobFailed):
    """The run's workers could not be placed within scaling.placement_timeout_s (exit 1, one line)."""


def startup_limits(timeout_s: float, elastic: bool = False) -> tuple[float, int]:
    """(seconds per attempt, retries after the first) for a total wait of about `timeout_s`; the attempt is
    the user's RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S when set."""
    try:
        attempt = float(
            os.environ.get(START_TIMEOUT_ENV) or min(ELASTIC_ATTEMPT_S if elastic else ATTEMPT_S, timeout_s)
        )
    except ValueError:
        attempt = 0.0
    if not (math.isfinite(attempt) and attempt > 0):
        raise UsageError(
            f"{START_TIMEOUT_ENV}={os.environ.get(START_TIMEOUT_ENV)!r} must be a positive number of seconds"
        )
    return attempt, max(0, math.ceil(timeout_s / attempt) - 1)


def fit(trainer, cfg):
    """trainer.fit() with each worker-group start bounded (the controller reads the variable when fit creates
    it; set for this call only); PlacementTimeout naming what is missing when the workers never got placed."""
    attempt, _ = startup_limits(cfg.scaling.placement_timeout_s, cfg.scaling.elastic)
    user = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = user or f"{attempt:g}"
    try:
        return trainer.fit()
    except Exception as e:
        if type(getattr(e, "controller_failure", None)).__name__ == "WorkerGroupStartupTimeoutError":
            import ray

            raise PlacementTimeout(placement_failure(cfg, ray.nodes(), ray.available_resources())) from None
        raise
    finally:
        if user is None:
            os.environ.pop(START_TIMEOUT_ENV, None)


@contextmanager
def reserved(cfg, count: int, what: str, gpu: bool = False):
    """For the driver's own Ray tasks before training (shard hashing, the eval cache): `count` bundles of a
    worker's CPUs (and its GPU with `gpu`), reserved within scaling.placement_timeout_s or PlacementTimeout; yields the tasks'
    scheduling strategy. Only the wait for resources is bounded, not the work."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = worker_resources(cfg) if gpu else {"CPU": cfg.scaling.cpus_per_worker}
    group = placement_group([bundle] * count)
    try:
        ready, _ = ray.wait([group.ready()], timeout=cfg.scaling.placement_timeout_s)
        if not ready:
            raise PlacementTimeout(placement_failure(cfg, ray.nodes(), ray.available_resources(), what, count))
        yield PlacementGroupSchedulingStrategy(group)
    finally:
        remove_placement_group(group)


def worker_resources(cfg) -> dict:
    s = cfg.scaling
    return {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}


def placement_failure(cfg, nodes: list[dict], free: dict, what: str = "training worker", count: int = 0) -> str:
    """One line naming what `count` (default scaling.num_workers) `what`s need, what the cluster's alive nodes
    have and have free, and the fix. `nodes`: ray.nodes(); `free`: ray.available_resources()."""
    s = cfg.scaling
    count = count or s.min_workers
    per_worker = worker_resources(cfg)
    need = ", ".join(f"{v:g} {k}" for k, v in per_worker.items())
    alive = [n for n in nodes if n.get("Alive")]
    dead = len(nodes) - len(alive)
    have = "; ".join(
        f"{n.get('NodeManagerAddress', '?')}: "
        + ", ".join(f"{n.get('Resources', {}).get(k, 0):g} {k}" for k in per_worker)
        for n in alive
    )
    fix = (
        "bring the lost node back or add one, lower scaling.num_workers, or use scaling.placement_strategy=SPREAD"
        if s.placement_strategy == "STRICT_SPREAD"
        else "free the cluster's resources (a stopped job's placement groups: `ray list placement-groups`), "
        "add nodes, or lower scaling.num_workers / scaling.cpus_per_worker"
    )
    return (
        f"the {count} {what}(s) ({need} each, {s.placement_strategy}) could not be placed within "
        f"scaling.placement_timeout_s={s.placement_timeout_s:g} s; the cluster has {len(alive)} alive node(s)"
        + (f" ({have})" if have else "")
        + (f" and {dead} lost" if dead else "")
        + ", with "
        + ", ".join(f"{free.get(k, 0):g} {k}" for k in per_worker)
        + " free"
        + f"; {fix}"
    )
