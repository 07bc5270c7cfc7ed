"""Object storage through one filesystem layer (sagan/storage.py), against a real S3 server on 127.0.0.1 (moto):
an unusable bucket, endpoint or key is one line within seconds, before Ray starts; a run checkpoints into it."""

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sagan.storage import StorageError, check_storage
from tests.servers import Endpoint, S3Server, objects, read_object, upload, write_object

REPO = Path(__file__).resolve().parent.parent


def test_a_writable_bucket_passes_the_check_and_keeps_nothing_of_it(s3):
    check_storage(f"{s3}/runs", "run.storage_path")
    assert objects(s3) == []  # the probe object was removed (pyarrow may leave an empty folder marker)


def test_a_missing_bucket_is_one_line_within_seconds(s3):
    start = time.monotonic()
    with pytest.raises(StorageError) as e:
        check_storage("s3://no-such-bucket/runs", "run.storage_path")
    message = str(e.value)
    assert message.startswith("run.storage_path=s3://no-such-bucket/runs: the bucket no-such-bucket does not exist")
    assert os.environ["AWS_ENDPOINT_URL"] in message and "\n" not in message
    assert time.monotonic() - start < 10


def test_an_unreachable_endpoint_is_one_line_within_seconds(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(StorageError) as e:
        check_storage(f"{s3}/runs", "run.storage_path")
    message = str(e.value)
    assert "cannot be used" in message and "Could not connect" in message and "AWS_ENDPOINT_URL" in message
    assert "\n" not in message and time.monotonic() - start < 10


def test_refused_credentials_are_one_line_within_seconds(tmp_path, monkeypatch):
    strict = S3Server(tmp_path, auth=True).start()  # knows no key at all: every request is refused
    try:
        for key, value in strict.env().items():
            monkeypatch.setenv(key, value)
        start = time.monotonic()
        with pytest.raises(StorageError) as e:
            check_storage("s3://bucket/runs", "run.storage_path")
    finally:
        strict.kill()
    message = str(e.value)
    assert "ACCESS_DENIED" in message and "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message, message
    assert "\n" not in message and time.monotonic() - start < 10


@pytest.mark.parametrize("key", ["run.storage_path", "data.train_shards", "eval.cache_dir"])
def test_train_refuses_unusable_storage_before_ray_starts(s3, digits, tmp_path, capsys, monkeypatch, key):
    import pipelines.train as train

    monkeypatch.setattr(train, "launch", lambda cfg: pytest.fail("Ray was started before the storage was checked"))
    args = [
        f"data.train_shards={digits / 'train'}",
        f"run.storage_path={tmp_path / 'runs'}",
        "train.eval_every=0",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        f"{key}=s3://no-such-bucket/x",
    ]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {key}=s3://no-such-bucket/x") and len(err.splitlines()) == 1, err
    assert "the bucket no-such-bucket does not exist" in err


def test_a_run_on_s3_reads_its_data_checkpoints_and_resumes_there(s3, digits, tmp_path):
    """train.py in its own process (its Ray workers inherit the AWS variables, as a cluster's nodes would): data
    and checkpoints on S3; a relaunch checks the latest checkpoint on the driver, finds it damaged, and resumes
    from the newest intact one, with a warning, into the same MLflow run."""
    import mlflow
    import torch

    upload(digits, f"{s3}/digits")  # the data on S3 too: read whole-shard, hashed in Ray tasks from there
    args = [
        f"data.train_shards={s3}/digits/train",
        f"run.storage_path={s3}/runs",
        "run.name=on-s3",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        "model.ch=8",
        "train.batch_size=4",
        "train.ckpt_every=2",
        "train.eval_every=0",
        "data.verify=full",
        "scaling.num_workers=1",
        "scaling.cpus_per_worker=0.5",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def launch(steps: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(REPO / "pipelines" / "train.py"), *args, f"train.steps={steps}"],
            cwd=tmp_path,
            env={**env, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"},
            capture_output=True,
            text=True,
            timeout=400,
        )

    first = launch(4)
    assert first.returncode == 0, first.stderr[-3000:]
    run = f"{s3}/runs/on-s3"
    saved = sorted(
        p.split("/")[0] for p in objects(run) if p.startswith("checkpoint_") and p.endswith("/checkpoint.pt")
    )
    assert len(saved) == 2, objects(run)  # steps 2 and 4 (run.keep_checkpoints=2)
    write_object(f"{run}/{saved[-1]}/checkpoint.pt", b"not a checkpoint")  # the latest, damaged
    second = launch(6)
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout + second.stderr
    damaged = f"{run}/{saved[-1]}"
    assert (
        f"the latest checkpoint of run on-s3 ({damaged}) is damaged (checkpoint {damaged}/checkpoint.pt cannot" in out
    )
    assert "sagan-copy-" not in out  # the messages name the object, never the temporary copy
    assert f"resuming from the newest intact one, {run}/{saved[0]} (step 2)" in out
    assert "resumed from step 2" in out
    latest = sorted(p for p in objects(run) if p.startswith("checkpoint_") and p.endswith("/checkpoint.pt"))[-1]
    state = torch.load(io.BytesIO(read_object(f"{run}/{latest}")), weights_only=True)
    assert state["step"] == 6
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("sagan-train").experiment_id])
    assert mlflow_run.info.status == "FINISHED"  # one run, continued by the relaunch
    assert not (tmp_path / "s3:").exists()  # nothing went to a local folder named after the URL


def test_a_run_goes_on_through_an_s3_server_that_freezes_and_one_that_restarts(digits, tmp_path, monkeypatch):
    """The store freezes (SIGSTOP: connections hang, as in a network partition) for 6 s after the run's first
    checkpoint; after its second, it goes away (every connection reset, new ones too, as a restarting server
    does) for 8 s and comes back with its data. The run finishes at its last step with every checkpoint and every
    logged step."""
    import signal

    import mlflow
    import pyarrow.fs as pafs

    server = S3Server(tmp_path).start()
    endpoint = Endpoint(server.port).up()  # the clients' way in: what "restarts"
    try:
        aws = {**server.env(), "AWS_ENDPOINT_URL": endpoint.url}
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **aws}
        for key, value in aws.items():  # this process reads the bucket too
            monkeypatch.setenv(key, value)
        host = server.url.removeprefix("http://")
        pafs.S3FileSystem(endpoint_override=host, scheme="http", allow_bucket_creation=True).create_dir("frozen")
        upload(digits, "s3://frozen/digits")
        args = [
            "data.train_shards=s3://frozen/digits/train",
            "run.storage_path=s3://frozen/runs",
            "run.name=frozen",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
            "model.ch=8",
            "train.batch_size=4",
            "train.steps=20",  # the steps after the second checkpoint need the store: 12, 16 and 20 are saved
            "train.ckpt_every=4",
            "train.log_every=2",
            "train.eval_every=0",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=0.5",
        ]
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "pipelines" / "train.py"), *args],
            cwd=tmp_path,
            env={**env, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        def wait_for_checkpoints(n: int, deadline=time.monotonic() + 300) -> None:
            while sum(p.endswith("/checkpoint.pt") for p in objects("s3://frozen/runs/frozen")) < n:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
                time.sleep(0.2)

        wait_for_checkpoints(1)
        os.killpg(server.proc.pid, signal.SIGSTOP)
        time.sleep(6)
        assert proc.poll() is None  # the run needed the store meanwhile (its next checkpoints): it waited
        os.killpg(server.proc.pid, signal.SIGCONT)
        wait_for_checkpoints(2)
        endpoint.down()
        time.sleep(8)
        assert proc.poll() is None
        endpoint.up()
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, out[-3000:]
        checkpoints = sorted(p for p in objects("s3://frozen/runs/frozen") if p.endswith("/checkpoint.pt"))
        state = torch.load(io.BytesIO(read_object(f"s3://frozen/runs/frozen/{checkpoints[-1]}")), weights_only=True)
        assert state["step"] == 20 and len(checkpoints) == 2  # steps 16 and 20 kept (run.keep_checkpoints=2)
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
        (run,) = client.search_runs([client.get_experiment_by_name("sagan-train").experiment_id])
        assert run.info.status == "FINISHED"
        # every step once: each request rode the outage out (sagan.storage.S3_ATTEMPTS), no worker was restarted
        assert [m.step for m in client.get_metric_history(run.info.run_id, "d_loss")] == list(range(2, 21, 2))
        assert "resumed from" not in out
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGCONT)
        server.kill()


def test_the_local_clusters_mlflow_server_keeps_artifacts_on_s3(s3, tmp_path):
    """cluster/local.py's MLflow server with --artifacts-destination on the S3 server: a client that only speaks
    HTTP to the tracking server (no AWS keys, as on a node) logs an artifact, and it lands in the bucket."""
    import mlflow

    from cluster.local import mlflow_command
    from tests.servers import free_port, kill_group, wait_for

    port = free_port()
    log = open(tmp_path / "mlflow.log", "ab")
    server = subprocess.Popen(
        mlflow_command(tmp_path, port, f"{s3}/mlartifacts"), stdout=log, stderr=log, start_new_session=True
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", 90, f"mlflow server did not start; see {tmp_path / 'mlflow.log'}")
        (tmp_path / "grid.txt").write_text("a sample grid")
        client_env = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}  # the node has none
        try:
            client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
            run = client.create_run(client.create_experiment("on-s3"))
            client.log_artifact(run.info.run_id, str(tmp_path / "grid.txt"), "samples")
        finally:
            os.environ.update(client_env)
        stored = [k for k in objects(f"{s3}/mlartifacts") if k.endswith("samples/grid.txt")]
        assert len(stored) == 1 and read_object(f"{s3}/mlartifacts/{stored[0]}") == b"a sample grid"
        assert not (tmp_path / "mlartifacts").exists()
    finally:
        kill_group(server)


def test_an_s3_filesystem_sent_to_rays_processes_keeps_its_retries(s3, s3_server, monkeypatch):
    """Ray Train pickles the run's filesystem for its controller and workers; pyarrow's pickling drops the retry
    strategy (apache/arrow GH-47348), which would leave them pyarrow's 3 attempts (about 3 s): the copy must ride
    out a store away for 5 s."""
    import pickle
    import threading

    import cloudpickle

    from sagan.storage import filesystem

    endpoint = Endpoint(s3_server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.url)
    write_object(f"{s3}/x.txt", b"kept")
    fs, _ = filesystem(s3)
    copy = pickle.loads(cloudpickle.dumps(fs))
    endpoint.down()
    threading.Timer(5, endpoint.up).start()
    start = time.monotonic()
    with copy.open_input_stream(f"{s3.removeprefix('s3://')}/x.txt") as f:
        assert f.read() == b"kept"
    assert time.monotonic() - start > 4  # it waited for the store: it did not get the answer some other way
