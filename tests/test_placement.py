"""Never waiting forever for workers: a bounded placement wait that ends in one line naming what is missing, a
sweep driver that removes an ended trial's placement group, and Ray's helpers pinned to their own cluster while
another runs on the same host."""

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

REPO = Path(__file__).resolve().parent.parent


def tiny_run(digits, tmp_path, *overrides) -> list[str]:
    """train.py's arguments for a 2-step run of 2 half-CPU workers, without in-loop FID."""
    return [
        f"data.train_shards={digits / 'train'}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "model.ch=8",
        "train.batch_size=4",
        "train.steps=2",
        "train.eval_every=0",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=0.5",
        *overrides,
    ]


@pytest.mark.parametrize(
    "verify, what",
    [("full", "the 2 shard-verification task(s)"), ("size", "the 2 training worker(s)")],  # before / at fit
)
def test_workers_that_cannot_be_placed_fail_in_one_line_within_the_bound(
    ray_session, digits, tmp_path, capsys, verify, what
):
    """Every CPU of the session's cluster held by another placement group (a stopped trial's leak, or a busy
    cluster): the launch waits scaling.placement_timeout_s, not forever, then names what it needed and what is
    free; the driver's own tasks (hashing the shards) are bounded as Ray Train's workers are."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from pipelines.train import main

    hog = placement_group([{"CPU": ray_session.cluster_resources()["CPU"]}])
    ray_session.get(hog.ready(), timeout=120)
    args = tiny_run(digits, tmp_path, "scaling.placement_timeout_s=3", f"data.verify={verify}")
    start = time.monotonic()
    try:
        code = main(args)
    finally:
        remove_placement_group(hog)
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err
    assert err[-1].startswith(f"error: {what} (0.5 CPU each, PACK) could not be placed within "), err
    assert "scaling.placement_timeout_s=3 s" in err[-1] and "1 alive node(s)" in err[-1] and "0 CPU free" in err[-1]
    assert elapsed < 90, elapsed  # 3 s of waiting, plus Ray's start of the controller on 2 busy cores
    if verify == "size":  # the MLflow run was opened: it ends FAILED, not left RUNNING
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        (run,) = client.search_runs([client.get_experiment_by_name("sagan-train").experiment_id])
        assert run.info.status == "FAILED"


def test_resources_back_within_the_bound_let_the_run_go_on(ray_session, digits, tmp_path, monkeypatch, capsys):
    """The CPUs come back (a lost node rejoins) after Ray Train's first placement attempt timed out, within
    scaling.placement_timeout_s: the next attempt places the workers and the run finishes."""
    import threading

    from ray.util.placement_group import placement_group, remove_placement_group

    from pipelines.train import main

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "4")  # attempts of 4 s: the bound allows 15
    hog = placement_group([{"CPU": ray_session.cluster_resources()["CPU"]}])
    ray_session.get(hog.ready(), timeout=120)
    release = threading.Timer(10, remove_placement_group, args=(hog,))
    release.start()
    try:
        code = main(tiny_run(digits, tmp_path, "data.verify=size", "scaling.placement_timeout_s=60"))
    finally:
        release.join()
    assert code == 0, capsys.readouterr().err[-3000:]
    assert list((tmp_path / "runs" / "sagan-demo").glob("checkpoint_*"))


def test_the_sweep_driver_removes_an_ended_trials_placement_group(ray_session):
    from ray.util.placement_group import placement_group, placement_group_table

    from pipelines.sweep.tuner import ReleasePlacementGroups

    leaked = placement_group([{"CPU": 0.5}])  # a stopped trial's worker group, left CREATED
    ray_session.get(leaked.ready(), timeout=120)
    kept = placement_group([{"CPU": 0.5}])  # a running trial's: not touched
    ray_session.get(kept.ready(), timeout=120)
    release = ReleasePlacementGroups(grace_s=0.5)
    stopped, running = SimpleNamespace(trial_id="stopped"), SimpleNamespace(trial_id="running")
    release.on_trial_result(0, [], stopped, {"step": 10, "placement_group": leaked.id.hex()})
    release.on_trial_result(0, [], running, {"step": 10, "placement_group": kept.id.hex()})
    release.on_trial_complete(0, [], stopped)
    release.on_step_begin(1, [])
    assert placement_group_table(leaked)["state"] == "CREATED"  # not while Tune may still be stopping the trial
    time.sleep(0.6)
    release.on_step_begin(2, [])
    assert placement_group_table(leaked)["state"] == "REMOVED"
    assert placement_group_table(kept)["state"] == "CREATED"
    assert release.release("stopped") == []  # once only
    release.on_trial_error(0, [], running)
    release.on_experiment_end([])  # the sweep's end: whatever is still waiting
    assert placement_group_table(kept)["state"] == "REMOVED"


PINNED = """
import ray
from pipelines.common.ray_address import connect_ray

connect_ray(num_cpus=1, include_dashboard=True, log_to_driver=False)

@ray.remote(num_cpus=0)
class Marker:
    pass

marker = Marker.options(name="only-in-this-cluster").remote()
ray.get(marker.__ray_ready__.remote())

@ray.remote(num_cpus=0)
def names_seen():
    import ray.util.state  # how Ray Train's PlacementGroupCleaner finds its cluster (it is a plain actor)
    try:
        return [a.name for a in ray.util.state.list_actors()]
    except Exception as e:
        return f"{type(e).__name__}: {e}"

print("seen:", ray.get(names_seen.remote()))
"""


@pytest.mark.usefixtures("ray_session")
def test_ray_helpers_find_their_own_cluster_while_another_runs_on_the_host():
    """The session's cluster is up; a launch starts a second one. A worker of the launch asks the state API (as
    Ray Train's cleaner does, with no address) and reaches the launch's cluster. Unpinned, it would fail with
    "Found multiple active Ray instances" (or reach whichever cluster `ray start` recorded last)."""
    proc = subprocess.run([sys.executable, "-c", PINNED], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "seen: [" in proc.stdout and "'only-in-this-cluster'" in proc.stdout, proc.stdout
