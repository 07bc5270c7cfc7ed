"""Joining or starting Ray with the cluster's address pinned for every process the launch starts.

Ray's own helpers find "their" cluster through RAY_ADDRESS, else by looking for running clusters on the host:
with two on one machine (a test cluster, a second user), Ray Train's PlacementGroupCleaner actor died with
"Found multiple active Ray instances" and left a stopped sweep trial's placement group behind, so the next
trial waited for its workers forever (ray-project/ray#54305, #61756, #65447 are the family of such leaks).
Worker processes only see the job's runtime environment, not the driver's, so the address goes there.
"""

import os
import socket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _started_cluster() -> str | None:
    """The address of the cluster `ray start` left on this host, which ray.init() with no address joins, or None."""
    try:
        from ray._private.services import canonicalize_bootstrap_address  # how ray.init() itself decides

        return canonicalize_bootstrap_address(None)
    except Exception:  # noqa: BLE001 - another Ray version: fall back to starting a pinned local cluster
        return None


def connect_ray(export: bool = True, **init_kwargs) -> str:
    """ray.init(**init_kwargs) with RAY_ADDRESS pinned in the job's environment, unless Ray is up already (a
    test session); returns the cluster's GCS address. `export`: also set RAY_ADDRESS in this process (a driver's
    own helpers), when this call connected it."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address, port_env = os.environ.get("RAY_ADDRESS", ""), "RAY_GCS_SERVER_PORT"
    joining = None if address else _started_cluster()
    chosen = not address and not joining and port_env not in os.environ  # the GCS port is ours to choose
    if address and ":" in address and "://" not in address:  # a cluster to join, named host:port
        pinned = address
    elif joining:  # `ray start`'s cluster on this host, which ray.init() joins
        pinned = joining
    elif not address:  # a local cluster of our own, its GCS on a port chosen here so it can be pinned
        os.environ.setdefault(port_env, str(_free_port()))  # read by the head node ray.init starts
        pinned = f"{ray.util.get_node_ip_address()}:{os.environ[port_env]}"
    else:  # "auto", or a Ray client address: nothing to pin before connecting
        pinned = None
    try:
        ray.init(runtime_env={"env_vars": {"RAY_ADDRESS": pinned}} if pinned else None, **init_kwargs)
    except ValueError as e:  # the submitted job's runtime env sets RAY_ADDRESS itself: it is pinned already
        if "RAY_ADDRESS" not in str(e):
            raise
        ray.init(**init_kwargs)
    finally:
        if chosen:
            os.environ.pop(port_env, None)
    gcs = ray.get_runtime_context().gcs_address
    if export:
        os.environ["RAY_ADDRESS"] = gcs  # this process's own helpers, and what it starts
    return gcs
