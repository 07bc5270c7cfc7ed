import json
from pathlib import Path

from pipelines.common.run_folder import RAY_SNAPSHOT, RunFolder, absolute, is_remote


def test_a_local_run_folder_names_every_part():
    f = RunFolder("/data/runs", "r1")
    assert (f.uri, f.local, f.remote) == ("/data/runs/r1", Path("/data/runs/r1"), False)
    assert f.stopped == Path("/data/runs/r1/STOPPED.json")
    assert f.best_marker == Path("/data/runs/r1/best/best.json") and f.best == "/data/runs/r1/best"
    assert (f.samples, f.lock, f.pending) == (
        Path("/data/runs/r1/samples"),
        Path("/data/runs/r1/.lock"),
        Path("/data/runs/r1/mlflow-pending"),
    )
    assert f.checkpoint_file("checkpoint_x") == Path("/data/runs/r1/checkpoint_x/checkpoint.pt")


def test_a_remote_run_folder_has_no_local_parts_and_keeps_pending_items_in_a_local_cache():
    f = RunFolder("s3://bucket/runs/", "r1")
    assert f.remote and f.uri == "s3://bucket/runs/r1" and f.best == "s3://bucket/runs/r1/best"
    assert (f.local, f.stopped, f.best_marker, f.samples, f.lock, f.ray_latest()) == (None,) * 6
    assert f.pending == Path.home() / ".cache" / "sagan" / "mlflow-pending" / "r1"


def test_ray_latest_and_the_older_checkpoints_newest_first(tmp_path):
    f = RunFolder(str(tmp_path), "r")
    assert f.ray_latest() is None  # a new run
    for name in ("checkpoint_2026-01-01_00-00-01.000001", "checkpoint_2026-01-01_00-00-02.000001"):
        (tmp_path / "r" / name).mkdir(parents=True)
    latest = "checkpoint_2026-01-01_00-00-03.000001"
    (tmp_path / "r" / RAY_SNAPSHOT).write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": latest}})
    )
    assert f.ray_latest() == latest
    assert f.checkpoints_before(latest) == [
        "checkpoint_2026-01-01_00-00-02.000001",
        "checkpoint_2026-01-01_00-00-01.000001",
    ]
    (tmp_path / "r" / RAY_SNAPSHOT).write_text("{not json")
    assert f.ray_latest() is None


def test_remote_paths_stay_as_they_are_and_local_ones_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_remote("s3://b/p") and is_remote("gs://b") and not is_remote("/a/b") and not is_remote("runs")
    assert absolute("s3://b/p") == "s3://b/p" and absolute("") == "" and absolute(None) is None
    assert absolute("runs") == str(tmp_path / "runs")
