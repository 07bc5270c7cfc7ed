"""One live launch per run.name: the lock in the run folder, its takeover when abandoned, train.py and tune.py refusing."""

import json
import re
import socket
import subprocess
import sys
import time

import pytest

from pipelines.common.run_folder import LOCK_FILE
from pipelines.training.run_lock import RunLock, RunLockError, run_lock


def write_lock(run_dir, **fields):
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "host": socket.gethostname(),
        "pid": 1,
        "ray_job_id": "raysubmit_abc",
        "start": time.time() - 60,
        "heartbeat": time.time(),
        "heartbeat_s": 30.0,
        "token": "other",
        **fields,
    }
    (run_dir / LOCK_FILE).write_text(json.dumps(record))
    return record


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_acquire_while_held_is_refused_naming_the_holder(tmp_path):
    with run_lock(str(tmp_path), "r1"):
        with pytest.raises(RunLockError) as e, run_lock(str(tmp_path), "r1"):
            pass
    msg = str(e.value)
    assert msg.startswith("run r1 is already running (host ") and f"pid {__import__('os').getpid()}" in msg
    assert "Ray job none" in msg and "since " in msg and "ray job stop" in msg and "choose another run name" in msg
    assert "\n" not in msg


def test_lock_left_by_a_dead_pid_is_taken_over_with_a_warning(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path / "r2", pid=pid)
    warnings = []
    with run_lock(str(tmp_path), "r2", warn=warnings.append) as lock:
        assert json.loads(lock.path.read_text())["token"] == lock.token
    (line,) = warnings
    assert line.startswith("taking over the lock of run r2 left by host") and f"pid {pid} is no longer running" in line


def test_lock_from_another_host_with_a_fresh_heartbeat_is_refused(tmp_path):
    write_lock(tmp_path / "r3", host="node-7", pid=4242)
    with pytest.raises(
        RunLockError, match="host node-7, pid 4242, Ray job raysubmit_abc, since .*ray job stop raysubmit_abc"
    ):
        RunLock(tmp_path / "r3", "r3").acquire()
    assert json.loads((tmp_path / "r3" / LOCK_FILE).read_text())["token"] == "other"  # left alone


def test_lock_from_another_host_with_an_old_heartbeat_is_taken_over(tmp_path):
    write_lock(tmp_path / "r4", host="node-7", pid=4242, heartbeat=time.time() - 100)
    warnings = []
    with run_lock(str(tmp_path), "r4", warn=warnings.append):
        pass
    assert (
        len(warnings) == 1
        and "host node-7" in warnings[0]
        and re.search(r"heartbeat is 10[0-9]s old \(refreshed every 30s\)", warnings[0])
    )
    assert not (tmp_path / "r4" / LOCK_FILE).exists()


def test_heartbeat_refreshes_the_lock(tmp_path):
    with run_lock(str(tmp_path), "r5", heartbeat_s=0.05) as lock:
        first = json.loads(lock.path.read_text())["heartbeat"]
        deadline = time.time() + 10
        while json.loads(lock.path.read_text())["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.02)
        assert json.loads(lock.path.read_text())["heartbeat"] > first


def test_lock_is_released_on_keyboard_interrupt(tmp_path):
    with pytest.raises(KeyboardInterrupt), run_lock(str(tmp_path), "r6") as lock:
        (tmp_path / "r6" / "checkpoint_x").mkdir()
        raise KeyboardInterrupt
    assert not lock.path.exists() and (tmp_path / "r6").is_dir()


def test_release_leaves_a_lock_another_launch_took_over(tmp_path):
    with run_lock(str(tmp_path), "r7"):
        write_lock(tmp_path / "r7", token="successor")
    assert json.loads((tmp_path / "r7" / LOCK_FILE).read_text())["token"] == "successor"


def test_release_removes_the_run_folder_it_created_while_empty(tmp_path):
    with run_lock(str(tmp_path), "r8") as lock:
        pass
    assert not lock.path.exists() and not (tmp_path / "r8").exists()


def test_storage_without_conditional_writes_here_is_not_locked_with_one_warning():
    warnings = []
    with run_lock("gs://bucket/runs", "r9", warn=warnings.append) as lock:
        assert lock is None
    assert len(warnings) == 1 and "cannot be locked" in warnings[0]


@pytest.mark.parametrize("entry", ["train", "tune"])
def test_launch_is_refused_with_exit_2_while_the_run_is_locked(entry, digits, tmp_path, capsys, monkeypatch):
    import importlib

    module = importlib.import_module(f"pipelines.{entry}")
    monkeypatch.setattr(module, "launch" if entry == "train" else "sweep", lambda *a: pytest.fail("Ray work started"))
    args = [
        f"run.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        f"data.train_shards={digits / 'train'}",
        f"data.val_shards={digits / 'val'}",
    ]
    from pipelines.common.config import load_config

    cfg = load_config(module.DEMO_CONFIG, [])
    name = cfg.run.name if entry == "train" else cfg.tune.name
    write_lock(tmp_path / "runs" / name, host="node-7", pid=4242)
    assert module.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: run {name} is already running (host node-7, pid 4242") and len(err.splitlines()) == 1


@pytest.mark.parametrize("outcome", ["returns", "raises"])
def test_train_releases_the_lock_when_main_ends(outcome, digits, tmp_path, monkeypatch):
    import pipelines.train as train

    lock = tmp_path / "runs" / "r10" / LOCK_FILE
    held = []

    def launch(cfg):
        held.append(lock.is_file())
        if outcome == "raises":
            raise RuntimeError("training failed")
        return 0

    monkeypatch.setattr(train, "launch", launch)
    args = [
        f"run.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        "run.name=r10",
        f"data.train_shards={digits / 'train'}",
        f"data.val_shards={digits / 'val'}",
    ]
    if outcome == "raises":
        with pytest.raises(RuntimeError):
            train.main(args)
    else:
        assert train.main(args) == 0
    assert held == [True] and not lock.exists()


def test_on_s3_a_live_lock_refuses_a_second_launch_and_a_stale_one_is_taken_over(s3):
    """The lock object on a real S3 server (moto): conditional writes, no local file involved."""
    import boto3

    runs = f"{s3}/runs"
    warnings = []
    with run_lock(runs, "r1", heartbeat_s=0.2, warn=warnings.append) as first:
        time.sleep(0.6)  # a few heartbeats: the object is rewritten only while its ETag is ours
        assert first.etag and not warnings
        with pytest.raises(RunLockError) as e, run_lock(runs, "r1"):
            pass
        assert str(e.value).startswith("run r1 is already running (host ") and f"{runs}/r1/.lock" in str(e.value)
    client, bucket = boto3.client("s3"), s3.removeprefix("s3://")
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix="runs/r1/")  # released: removed
    stale = {"host": "gone-host", "pid": 1, "start": 0, "heartbeat": time.time() - 3600, "heartbeat_s": 30.0}
    client.put_object(Bucket=bucket, Key="runs/r2/.lock", Body=json.dumps({**stale, "token": "old"}).encode())
    with run_lock(runs, "r2", warn=warnings.append) as taken:
        record = json.loads(client.get_object(Bucket=bucket, Key="runs/r2/.lock")["Body"].read())
        assert record["token"] == taken.token and record["host"] == socket.gethostname()
    assert len(warnings) == 1 and "taking over the lock of run r2 left by host gone-host" in warnings[0]
    assert "heartbeat is" in warnings[0]
