import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (ray.init takes 10-20 s on 2 cores)."""
    import ray

    if not ray.is_initialized():
        # More logical CPUs than cores, a small object store, and the dashboard on (REFERENCE.md).
        ray.init(num_cpus=4, object_store_memory=200 * 1024**2, include_dashboard=True,
                 log_to_driver=False, configure_logging=False)  # fmt: skip
    yield ray
    ray.shutdown()
