"""Checks a launch runs before any worker starts, shared by train.py and tune.py: absolute paths, the data against
its manifest, the storage, the cluster's resources, the shards' hashes, and the eval cache filled in a Ray task.
"""

import os
import time
from pathlib import Path

from pipelines.common.config import Config
from pipelines.common.run_folder import absolute, is_remote
from pipelines.tracking.store import absolute_tracking_uri
from pipelines.training.placement import reserved
from sagan.config import INCEPTION, to_dict
from sagan.data import DataError, ShardSet, batches_per_epoch, find_shards, sha256_mismatch, size_mismatch
from sagan.errors import UserError
from sagan.storage import check_storage


class PreflightError(UserError):
    """Bad input found before any worker starts; printed as one line."""


def resolve_paths(cfg: Config) -> Config:
    """`cfg` with its local paths made absolute, as Ray workers (in another directory) need them."""
    cfg.data.train_shards = absolute(cfg.data.train_shards)
    cfg.data.val_shards = absolute(cfg.data.val_shards)
    cfg.run.storage_path = absolute(cfg.run.storage_path)
    cfg.eval.cache_dir = absolute(cfg.eval.cache_dir)
    cfg.data.cache_dir = absolute(cfg.data.cache_dir)
    cfg.eval.inception_weights = absolute(cfg.eval.inception_weights)
    if cfg.mlflow.tracking_uri:
        cfg.mlflow.tracking_uri = absolute_tracking_uri(cfg.mlflow.tracking_uri)
    return cfg


def preflight(cfg: Config, cluster: dict) -> None:
    """Both checks below: the inputs, then the cluster's resources."""
    check_inputs(cfg)
    check_cluster(cfg, cluster)


def check_cluster(cfg: Config, cluster: dict) -> None:
    """Raise PreflightError when the cluster (ray.cluster_resources()) lacks the workers' GPUs or CPUs."""
    s = cfg.scaling
    if s.use_gpu and cluster.get("GPU", 0) < s.min_workers:  # an elastic run starts with its minimum
        raise PreflightError(
            f"scaling.num_workers={s.num_workers}: {s.min_workers} GPU workers at least but the cluster has "
            f"{int(cluster.get('GPU', 0))} GPU(s) up; lower scaling.num_workers or start more GPU "
            "nodes (an autoscaling cluster: raise the GPU node type's min_workers)"
        )
    need = s.min_workers * s.cpus_per_worker
    if cluster.get("CPU", 0) < need:
        raise PreflightError(
            f"{s.min_workers} workers x {s.cpus_per_worker} CPUs = {need} CPUs but the cluster has "
            f"{cluster.get('CPU', 0)}; lower scaling.num_workers or scaling.cpus_per_worker"
        )


def check_inputs(cfg: Config) -> None:
    """Raise PreflightError for bad data (a shard off its manifest's size too, unless data.verify=off),
    mismatched classes or unwritable storage. Needs no Ray: run it before ray.init, which takes seconds."""
    if cfg.data.cache_dir and is_remote(cfg.data.cache_dir):
        raise PreflightError(
            f"data.cache_dir={cfg.data.cache_dir} is a URL; it must be a folder on each node's disk, where the "
            "loader keeps local copies of the shards it reads from object storage"
        )
    if cfg.eval.cache_dir and is_remote(cfg.eval.cache_dir):
        check_storage(cfg.eval.cache_dir, "eval.cache_dir")
    for key, value in (("data.train_shards", cfg.data.train_shards), ("data.val_shards", cfg.data.val_shards)):
        if key == "data.train_shards" or cfg.train.eval_every:  # endpoint, credentials, bucket, in seconds
            check_storage(value, key, writable=False)
    try:
        shards = find_shards(cfg.data.train_shards)
        batches_per_epoch(shards, cfg.scaling.max_workers, cfg.train.batch_size)  # planned for MAX ranks
    except DataError as e:
        raise PreflightError(f"data.train_shards: {e}") from None
    if shards.num_classes != cfg.model.num_classes:
        raise PreflightError(
            f"the shards hold {shards.num_classes} classes but model.num_classes is "
            f"{cfg.model.num_classes}; set model.num_classes={shards.num_classes}"
        )
    if shards.image_size != cfg.model.resolution:
        raise PreflightError(
            f"the shards hold {shards.image_size}px images but model.resolution is "
            f"{cfg.model.resolution}; reshard with --size {cfg.model.resolution} or change it"
        )
    for key, shard_set in planned_shards(cfg, shards).items():
        problem = size_mismatch(shard_set) if cfg.data.verify != "off" else None
        if problem:
            raise PreflightError(f"{key}: {problem}")
    storage = cfg.run.storage_path
    check_storage(storage, "run.storage_path")  # object storage: endpoint, credentials, bucket, a write, in seconds
    if not is_remote(storage):
        try:
            Path(storage).mkdir(parents=True, exist_ok=True)
            probe = Path(storage) / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise PreflightError(f"run.storage_path {storage} is not writable ({e.strerror}); choose another") from None


def planned_shards(cfg: Config, train: ShardSet | None = None) -> dict[str, ShardSet]:
    """The shards the run reads, by config key: the train shards, and the real images for in-loop FID when it is
    on; PreflightError when they cannot be found or do not match the model."""
    try:
        planned = {"data.train_shards": train or find_shards(cfg.data.train_shards)}
    except DataError as e:
        raise PreflightError(f"data.train_shards: {e}") from None
    if cfg.train.eval_every:  # in-loop FID compares against these
        from sagan.metrics import MetricsError, real_shards  # torch-fidelity loads only with in-loop FID on

        try:
            real = real_shards(cfg)
        except MetricsError as e:
            raise PreflightError(str(e)) from None
        planned.setdefault(f"data.{cfg.eval.real_split}_shards", real)
    return planned


def verify_shards(cfg: Config) -> None:
    """With data.verify=full, compare every planned shard's sha256 with its manifest's in scaling.num_workers Ray
    tasks (a worker's CPUs, no GPU), before the workers start; PreflightError naming the first damaged shard.

    The shards are dealt round-robin, so each task reads about what a rank reads in an epoch and the check costs
    about one pass over a worker's share. On a cluster the tasks run where Ray puts them: the shards must be on
    storage every node sees, as the workers need anyway.
    """
    if cfg.data.verify != "full":
        return
    import ray  # here, not at the top: train.py and tune.py run the checks above before Ray loads (seconds)

    urls, sha256s, total = [], [], 0
    for shard_set in planned_shards(cfg).values():
        urls += shard_set.urls
        sha256s += shard_set.sha256s
        total += sum(shard_set.sizes)
    k = min(cfg.scaling.min_workers, len(urls))
    print(f"verifying {len(urls)} shards ({total / 1e9:.2f} GB) with sha256 on {k} tasks ...", end=" ", flush=True)
    start = time.perf_counter()
    with reserved(cfg, k, "shard-verification task") as where:  # a worker's CPUs each, within the placement bound
        task = ray.remote(num_cpus=cfg.scaling.cpus_per_worker, num_gpus=0, scheduling_strategy=where)(sha256_mismatch)
        problems = [p for p in ray.get([task.remote(urls[i::k], sha256s[i::k]) for i in range(k)]) if p]
    seconds = time.perf_counter() - start
    print(
        f"damaged shard found in {seconds:.1f} s"
        if problems
        else f"ok in {seconds:.1f} s ({total / 1e6 / max(seconds, 1e-9):.0f} MB/s)",
        flush=True,
    )
    if problems:
        raise PreflightError(problems[0])


def multinode_warnings(cfg: Config, tracking_uri: str, nodes: int, submitted: bool) -> list[str]:
    """One line each for what a cluster of `nodes` live nodes (or a submitted job, whose nodes may change)
    cannot share: a sqlite MLflow store, a local run.storage_path, a node-local eval cache for in-loop FID."""
    if nodes <= 1 and not submitted:
        return []
    where = f"the cluster has {nodes} nodes" if nodes > 1 else "a submitted job may run on any node"
    out = []
    if tracking_uri.startswith("sqlite:"):
        out.append(
            f"MLflow store {tracking_uri} is a file on this node, but {where}: set mlflow.tracking_uri to a "
            "tracking server (mlflow server ...; cluster/kuberay/mlflow.yaml)"
        )
    if nodes > 1 and not is_remote(cfg.run.storage_path):
        out.append(
            f"run.storage_path {cfg.run.storage_path} is a local path and {where}: every node must see the "
            "same folder (an NFS/EFS/Filestore mount on all of them) or use a bucket (s3://..., gs://...)"
        )
    if nodes > 1 and cfg.train.eval_every and not cfg.eval.cache_dir and is_remote(cfg.data.train_shards):
        out.append(
            f"in-loop FID's real statistics go to each node's ~/.cache/sagan (the shards are in a bucket) and {where}: "
            "rank 0 may compute them again, while the other ranks wait; set eval.cache_dir=s3://... (or a shared folder)"
        )
    return out


def prepare_evaluation(cfg: Config) -> None:
    """For in-loop FID: fill the eval cache (the extractor's weights, the real statistics) in one Ray task
    with a worker's resources, before the workers start; PreflightError when the weights cannot be had.

    Rank 0 would otherwise compute the statistics while the other ranks wait in a collective, which times out
    on a large real split. On a cluster the cache must be on shared storage (eval.cache_dir, or the default
    next to the shards) for rank 0 to find it.
    """
    if not cfg.train.eval_every:
        return
    # Ray, Ray Train (with the task's function) and torch-fidelity load only when in-loop FID is on
    # (benchmarks/import_times.py): the checks above run before any of them.
    import ray

    from pipelines.training.worker import prepare_eval_cache
    from sagan.metrics import MetricsError

    s = cfg.scaling
    try:
        with reserved(cfg, 1, "eval-cache task", gpu=True) as where:
            task = ray.remote(num_cpus=s.cpus_per_worker, num_gpus=1 if s.use_gpu else 0, scheduling_strategy=where)
            weights = ray.get(task(prepare_eval_cache).remote(to_dict(cfg)))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, (MetricsError, DataError)):  # DataError: a real-image shard that does not read
            raise PreflightError(str(e.cause)) from None
        raise
    if cfg.eval.feature_extractor == INCEPTION:
        if not is_remote(cfg.eval.cache_dir):  # on object storage, rank 0 finds it in its node's mirror
            cfg.eval.inception_weights = weights  # the copy in the shared cache, for rank 0 wherever it runs
