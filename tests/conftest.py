import os

import pytest

# Ray Train v2's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and moves
# from one state to the next only at a poll: a tiny test run's start, reports and end each wait for one. Set
# before the session's ray.init, so the raylet, every controller and worker, and the jobs the tests start inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Every fit would also start a PreemptionWatcher actor (one more process on 2 cores) to poll for node drains,
# which a single-node test cluster never has.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (ray.init takes 10-20 s on 2 cores)."""
    import ray

    from pipelines.common.ray_address import connect_ray

    if not ray.is_initialized():
        # More logical CPUs than cores, a small object store, and the dashboard on (Ray on a 2-core machine: logical
        # CPUs may exceed cores; a small store fits its memory). The address is pinned for Ray's own helpers, as
        # train.py and tune.py do (other Ray clusters run on this host during the suite), but not exported to
        # this process: the tests' subprocesses start or join clusters of their own choosing.
        connect_ray(
            export=False,
            num_cpus=4,
            object_store_memory=200 * 1024**2,
            include_dashboard=True,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The built-in sample set sharded at 32px in 200-image shards: OUT/{train,val}/*.tar + manifest.json."""
    from preprocessing.make_sample_data import write_sample_data
    from preprocessing.shard_imagenet import main as shard_main

    root = tmp_path_factory.mktemp("digits")
    write_sample_data(root / "raw")
    assert (
        shard_main(["--src", str(root / "raw"), "--out", str(root / "shards"), "--size", "32", "--shard-size", "200"])
        == 0
    )
    return root / "shards"


@pytest.fixture(scope="session")
def folder_tree(tmp_path_factory):
    """A small fake ImageNet in the folders layout (tests/fake_imagenet.py), with odd files: (root, its files)."""
    from tests.fake_imagenet import make_tree

    root = tmp_path_factory.mktemp("src")
    return root, make_tree(root, "folders")


@pytest.fixture(scope="session")
def folder_out(folder_tree, tmp_path_factory):
    """`folder_tree` sharded on a disk, 4 samples per shard (tests/test_shard_imagenet.py's `shard`)."""
    from tests.test_shard_imagenet import shard

    out = tmp_path_factory.mktemp("out") / "shards"
    assert shard(folder_tree[0], out) == 0
    return out


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory):
    """One cache folder per session, so the sample classifier is trained once (~15 s) for every test."""
    return tmp_path_factory.mktemp("eval-cache")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One moto S3 server for the session (tests/servers.py); tests make their own buckets."""
    from tests.servers import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.kill()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The session's S3 server as this test's storage: the AWS variables set, and a fresh bucket; its URL."""
    import uuid

    import pyarrow.fs as pafs

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    port = s3_server.port
    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True).create_dir(
        bucket
    )
    return f"s3://{bucket}"
