import json
from pathlib import Path

import pytest

from pipelines.common.run_folder import RAY_SNAPSHOT, RunFolder, absolute, is_remote
from sagan.storage import user_cache
from tests.servers import write_object


def test_a_local_run_folder_names_every_part():
    f = RunFolder("/data/runs", "r1")
    assert (f.uri, f.local, f.remote) == ("/data/runs/r1", Path("/data/runs/r1"), False)
    assert f.stopped == "/data/runs/r1/STOPPED.json"
    assert f.best_marker == "/data/runs/r1/best/best.json" and f.best == "/data/runs/r1/best"
    assert (f.samples, f.lock, f.pending) == (
        Path("/data/runs/r1/samples"),
        Path("/data/runs/r1/.lock"),
        Path("/data/runs/r1/mlflow-pending"),
    )
    assert f.checkpoint_file("checkpoint_x") == "/data/runs/r1/checkpoint_x/checkpoint.pt"


def test_a_remote_run_folder_names_its_parts_by_url_and_keeps_pending_items_in_a_local_cache():
    f = RunFolder("s3://bucket/runs/", "r1")
    assert f.remote and f.uri == "s3://bucket/runs/r1" and f.best == "s3://bucket/runs/r1/best"
    assert (f.stopped, f.best_marker) == ("s3://bucket/runs/r1/STOPPED.json", "s3://bucket/runs/r1/best/best.json")
    assert (f.local, f.samples, f.lock) == (None,) * 3
    assert f.pending.parent == user_cache() / "mlflow-pending" and f.pending.name.startswith("r1-")
    assert RunFolder("s3://other/runs", "r1").pending != f.pending  # one name in two buckets: two folders


@pytest.mark.parametrize("where", ["disk", "s3"])
def test_ray_latest_and_the_older_checkpoints_newest_first(tmp_path, request, where):
    storage = str(tmp_path) if where == "disk" else request.getfixturevalue("s3")
    f = RunFolder(storage, "r")
    assert f.ray_latest() is None  # a new run
    for name in ("checkpoint_2026-01-01_00-00-01.000001", "checkpoint_2026-01-01_00-00-02.000001"):
        write_object(f.checkpoint_file(name), b"x")  # a folder on a disk; a key prefix on S3
    latest = "checkpoint_2026-01-01_00-00-03.000001"
    write_object(
        f"{f.uri}/{RAY_SNAPSHOT}", json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": latest}}).encode()
    )
    assert f.ray_latest() == latest
    assert f.checkpoints_before(latest) == [
        "checkpoint_2026-01-01_00-00-02.000001",
        "checkpoint_2026-01-01_00-00-01.000001",
    ]
    write_object(f"{f.uri}/{RAY_SNAPSHOT}", b"{not json")
    assert f.ray_latest() is None


def test_remote_paths_stay_as_they_are_and_local_ones_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_remote("s3://b/p") and is_remote("gs://b") and not is_remote("/a/b") and not is_remote("runs")
    assert absolute("s3://b/p") == "s3://b/p" and absolute("") == "" and absolute(None) is None
    assert absolute("runs") == str(tmp_path / "runs")


@pytest.mark.parametrize("where", ["disk", "s3"])
def test_resume_world_is_that_of_the_checkpoint_in_rays_snapshot_not_the_newest_on_storage(tmp_path, request, where):
    from sagan.checkpoint import save_checkpoint
    from sagan.models import build_models
    from sagan.step import Trainer
    from tests.test_step import tiny_config

    storage = str(tmp_path / "runs") if where == "disk" else request.getfixturevalue("s3")
    f = RunFolder(storage, "r")
    assert f.resume_world() is None  # no snapshot yet
    cfg = tiny_config()
    trainer = Trainer(*build_models(cfg.model, seed=0), cfg)
    names = {2: "checkpoint_2026-01-01_00-00-01.000001", 1: "checkpoint_2026-01-01_00-00-02.000001"}
    for world, name in names.items():
        local = save_checkpoint(tmp_path / f"w{world}.pt", trainer, cfg, extra={"world_size": world})
        write_object(f.checkpoint_file(name), local.read_bytes())
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": names[2]}}  # Ray has not taken the newest yet
    write_object(f"{f.uri}/{RAY_SNAPSHOT}", json.dumps(snapshot).encode())
    assert f.resume_world() == 2
    snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] = names[1]
    write_object(f"{f.uri}/{RAY_SNAPSHOT}", json.dumps(snapshot).encode())
    assert f.resume_world() == 1
    write_object(f.checkpoint_file(names[1]), b"pruned half-way")
    assert f.resume_world() is None
