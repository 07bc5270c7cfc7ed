"""The Ray Tune sweep (pipelines/tune.py) on the session's local Ray: tiny models, 20 steps per trial."""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch

from pipelines.common.config import load_config
from pipelines.sweep.space import combinations
from pipelines.sweep.trials import ROLE_TAG, SWEEP_TAG, TRIAL_TAG
from pipelines.tune import main
from sagan.models import build_models
from sagan.step import Trainer
from tests.servers import TrackingServer

REPO = Path(__file__).resolve().parent.parent


def sweep_args(digits, tmp_path, name, *overrides, cache=None):
    return [
        f"data.train_shards={digits / 'train'}",
        f"data.val_shards={digits / 'val'}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"eval.cache_dir={cache or tmp_path / 'cache'}",
        "model.ch=8",
        "train.batch_size=4",
        "scaling.cpus_per_worker=0.5",
        "train.log_every=5",
        "train.ckpt_every=5",
        "train.eval_every=10",
        "train.sample_every=20",
        "eval.loop_samples=100",
        f"tune.name={name}",
        "tune.steps=20",
        "tune.grace_period=10",
        "tune.attn=[[16]]",
        "tune.ratio=[1]",
        *overrides,
    ]


def sweep_runs(tmp_path, name):
    """(client, parent run, child runs) of sweep `name` in the test's MLflow store."""
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sagan-tune")
    runs = client.search_runs([exp.experiment_id], f"tags.`{SWEEP_TAG}` = '{name}'")
    (parent,) = [r for r in runs if r.data.tags[ROLE_TAG] == "sweep"]
    return client, parent, [r for r in runs if r.data.tags[ROLE_TAG] == "trial"]


def sweep_folder(where: str, tmp_path, request) -> str:
    """A sweep's folder on a disk, or under a fresh bucket of the session's S3 server."""
    return str(tmp_path / "sweep") if where == "disk" else f"{request.getfixturevalue('s3')}/sweeps/sweep"


@pytest.mark.parametrize("where", ["disk", "s3"])
def test_a_rerun_with_changed_settings_is_refused_naming_them(tmp_path, request, where):
    from pipelines.sweep.space import SweepError, check_same_sweep

    folder = sweep_folder(where, tmp_path, request)
    cfg = load_config(None, ["tune.attn=[[16]]"])
    sweep_id = check_same_sweep(folder, combinations(cfg), cfg, restorable=False)
    assert check_same_sweep(folder, combinations(cfg), cfg, restorable=True) == sweep_id  # the same sweep
    changed = load_config(None, ["tune.attn=[[16]]", "model.ch=32"])
    with pytest.raises(SweepError, match=r"with other settings \(model.ch; relative paths .*\); rerun it unchanged"):
        check_same_sweep(folder, combinations(changed), changed, restorable=True)
    # Nothing to restore (the first run stopped at a pre-flight error): the corrected settings start afresh.
    assert check_same_sweep(folder, combinations(changed), changed, restorable=False) != sweep_id


def test_a_rerun_may_change_how_the_data_is_verified(tmp_path):
    from pipelines.sweep.space import check_same_sweep

    cfg = load_config(None, ["tune.attn=[[16]]"])
    sweep_id = check_same_sweep(str(tmp_path), combinations(cfg), cfg, restorable=False)
    off = load_config(None, ["tune.attn=[[16]]", "data.verify=off"])
    assert check_same_sweep(str(tmp_path), combinations(off), off, restorable=True) == sweep_id


def test_placements_are_tied_or_crossed_and_every_value_makes_a_trial():
    tied = load_config(None, ["tune.attn=[[16],[]]", "tune.ratio=[1,2,4]", "tune.seeds=[0,1]"])
    combos = combinations(tied)
    assert len(combos) == 2 * 3 * 2 and {(tuple(c["g_attn"]), tuple(c["d_attn"])) for c in combos} == {
        ((16,), (16,)),
        ((), ()),
    }
    own = load_config(None, ["model.g_attn=[8]", "model.d_attn=[16]"])  # no placement given: the model's own
    assert {(tuple(c["g_attn"]), tuple(c["d_attn"])) for c in combinations(own)} == {((8,), (16,))}
    crossed = load_config(None, ["tune.g_attn=[[16],[8,16]]", "tune.d_attn=[[],[16]]"])
    pairs = {(tuple(c["g_attn"]), tuple(c["d_attn"])) for c in combinations(crossed)}
    assert pairs == {((16,), ()), ((16,), (16,)), ((8, 16), ()), ((8, 16), (16,))}


@pytest.mark.parametrize(
    "override, message",
    [
        ("tune.attn=[[16],[12]]", "model.g_attn has no [12] feature map"),
        ("tune.ratio=[]", "tune.ratio is empty"),
        ("tune.attn=[]", "tune.attn (or tune.g_attn / tune.d_attn) is empty"),
        ("tune.metric=loop/accuracy", "tune.metric: 'loop/accuracy' is not reported by the training loop"),
        ("train.eval_every=0", "reported only with in-loop evaluation; set train.eval_every"),
        ("tune.grace_period=20", "tune.grace_period (20) must be below tune.steps (20)"),
        ("tune.g_attn=[[8]]", "tune.attn (tied placements) and tune.g_attn / tune.d_attn (crossed) are both set"),
        ("tune.name=it's", "tune.name: 'it's' must be letters, digits"),
        ("scaling.num_workers=[1,2]", "a sweep's trials take a fixed number of workers"),
    ],
)
def test_bad_search_space_fails_in_one_line_before_any_trial(digits, tmp_path, capsys, override, message):
    assert main(sweep_args(digits, tmp_path, "bad", override)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_sweep_stops_a_bad_trial_records_a_failed_one_and_reports_in_mlflow(
    ray_session, digits, eval_cache, tmp_path, capsys
):
    # lr_g 0.5 wrecks G within 10 steps (ASHA stops it at its rung); 1e30 makes the losses non-finite.
    args = sweep_args(
        digits,
        tmp_path,
        "study",
        "tune.lr_g=[4e-4,0.5,1e30]",
        "tune.max_concurrent_trials=1",
        "tune.steps=40",
        "train.eval_every=10",
        cache=eval_cache,
    )
    assert main(args) == 0
    client, parent, children = sweep_runs(tmp_path, "study")
    assert len(children) == 3 and all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    by_lr = {float(c.data.params["trial.lr_g"]): c for c in children}
    for lr, child in by_lr.items():  # each child holds its trial's hyper-parameters, like a training run
        assert float(child.data.params["optim.lr_g"]) == lr and float(child.data.params["optim.lr_d"]) == lr
        assert child.data.params["trial.g_attn"] == "[16]" and child.data.params["model.ch"] == "8"
    assert by_lr[4e-4].info.status == "FINISHED" and by_lr[4e-4].data.tags["sagan.stop_reason"] == "completed"
    # Stopped at a rung (which one depends on the in-loop FIDs of the trials before it): never completed.
    assert by_lr[0.5].info.status == "FINISHED" and by_lr[0.5].data.tags["sagan.stop_reason"].startswith(
        "ASHA at step "
    )
    assert (
        by_lr[1e30].info.status == "FAILED" and "non-finite loss at step" in by_lr[1e30].data.tags["sagan.stop_reason"]
    )
    good = by_lr[4e-4].info.run_id
    assert [m.step for m in client.get_metric_history(good, "loop/fid")] == [0, 10, 20, 30, 40]
    assert any("samples" in a.path for a in client.list_artifacts(good, "images"))

    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert report == {
        f"report/{f}" for f in ("trials.csv", "trials.md", "heatmap.png", "curves.png", "best_config.yaml")
    }
    folder = Path(client.download_artifacts(parent.info.run_id, "report", str(tmp_path / "dl")))
    rows = (folder / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("trial,ratio,lr_g,lr_d,g_attn,d_attn,seed,status,steps,stop_reason,best_loop/fid")
    assert sorted(r.split(",")[7] for r in rows[1:]) == ["completed", "failed", "stopped"]
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["best.lr_g"] == "0.0004"
    note = parent.data.tags["mlflow.note.content"]  # the parent's description in the UI: the verdict and the table
    assert note.startswith("Sweep study. Best: trial ") and "| trial | ratio |" in note
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.metrics["best_loop_fid"] == min(m.value for m in client.get_metric_history(good, "loop/fid"))
    assert parent.data.params["tune.lr_g"] == "[0.0004, 0.5, 1e+30]"

    best = load_config(folder / "best_config.yaml")  # loads as a training config, and trains
    assert best.optim.lr_g == 4e-4 and best.model.g_attn == (16,) and best.run.name == "study-best"
    trainer = Trainer(*build_models(best.model, seed=0), best)
    x, y = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randint(0, 10, (4,))
    assert all(torch.isfinite(trainer.train_step([(x, y)])["d_loss"]) for _ in range(2))
    out = capsys.readouterr().out
    assert "| trial | ratio |" in out and "best: trial" in out and "report: MLflow run" in out


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_session, digits, eval_cache, tmp_path):
    args = sweep_args(digits, tmp_path, "resume", "tune.ratio=[1,2]", "tune.max_concurrent_trials=1", cache=eval_cache)
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "pipelines" / "tune.py"), *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    client, trials, deadline = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), [], time.time() + 300
    while len(trials) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(1)  # one trial at a time: the second child run appears once Tune has ended the first trial
        exp = client.get_experiment_by_name("sagan-tune")
        if exp:
            trials = client.search_runs(
                [exp.experiment_id], "tags.`sagan.role` = 'trial'", order_by=["attributes.start_time ASC"]
            )
    assert len(trials) == 2, (tmp_path / "first.log").read_text()[-3000:]
    proc.send_signal(signal.SIGINT)  # Ctrl-C while the second trial runs
    assert proc.wait(timeout=120) == 130
    first_id = trials[0].info.run_id
    assert client.get_run(first_id).info.status == "FINISHED"
    _, parent, _ = sweep_runs(tmp_path, "resume")  # Ctrl-C: nothing left RUNNING, as train.py leaves a run KILLED
    assert parent.info.status == "KILLED" and client.get_run(trials[1].info.run_id).info.status == "KILLED"
    first_steps = [m.step for m in client.get_metric_history(first_id, "d_loss")]

    assert main(args) == 0
    _, parent, children = sweep_runs(tmp_path, "resume")
    assert len(children) == 2 and len({c.data.tags[TRIAL_TAG] for c in children}) == 2  # no duplicates
    second = next(c for c in children if c.info.run_id != first_id)
    # Completed, or stopped by ASHA (which one depends on where Ctrl-C caught it): never failed.
    assert second.info.status == "FINISHED" and second.data.tags["sagan.stop_reason"] != ""
    assert [m.step for m in client.get_metric_history(first_id, "d_loss")] == first_steps  # not run again
    assert parent.info.status == "FINISHED"
    # The report after the restore: each trial's best over its whole history, not only what came after it.
    folder = Path(client.download_artifacts(parent.info.run_id, "report", str(tmp_path / "dl")))
    rows = {r["trial"]: r for r in csv.DictReader((folder / "trials.csv").open())}
    for child in children:
        fids = {
            m.step: m.value
            for m in sorted(client.get_metric_history(child.info.run_id, "loop/fid"), key=lambda m: m.timestamp)
        }
        row = rows[child.data.tags[TRIAL_TAG]]
        assert row["best_loop/fid"] == f"{min(v for step, v in fids.items() if step):.4g}", (row, fids)
    assert rows[trials[0].data.tags[TRIAL_TAG]]["status"] == "completed"


def test_two_concurrent_trials_write_into_one_sqlite_store(ray_session, digits, eval_cache, tmp_path):
    args = sweep_args(digits, tmp_path, "pair", "tune.ratio=[1,2]", "tune.max_concurrent_trials=2", cache=eval_cache)
    assert main(args) == 0
    client, _, children = sweep_runs(tmp_path, "pair")
    # ASHA may stop the worse of the two at step 10; neither may fail.
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    a, b = children
    assert a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time  # they overlapped
    for child in children:  # every logged step of both reached the store
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "d_loss")]
        assert steps[-1] >= 10 and steps == list(range(5, steps[-1] + 1, 5))


@pytest.mark.parametrize("where", ["disk", "s3"])
def test_asha_rebuilds_its_rungs_from_saved_results_on_restore(tmp_path, request, where):
    import json
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from pipelines.sweep.asha import ResumableASHA
    from sagan.storage import ray_storage
    from tests.servers import write_object

    sweep = sweep_folder(where, tmp_path, request)

    def trial(name, results):
        folder = f"{sweep}/{name}"
        lines = "".join(json.dumps(r) + "\n" for r in results) + '{"step": 2'  # a cut line
        write_object(f"{folder}/result.json", lines.encode())
        # As Tune gives it: the trial's path inside its storage filesystem (S3 with an endpoint: pyarrow's).
        storage = ray_storage(folder)
        fs = storage.get("storage_filesystem")
        return SimpleNamespace(
            trial_id=name,
            path=folder,
            storage=SimpleNamespace(storage_filesystem=fs, trial_fs_path=storage["storage_path"]) if fs else None,
        )

    def asha():
        return ResumableASHA(
            time_attr="step", metric="loop/fid", mode="min", max_t=19, grace_period=10, reduction_factor=2
        )

    finished = trial("done", [{"step": 5}, {"step": 10, "loop/fid": 100.0}, {"step": 20, "loop/fid": 50.0}])
    worse = {"step": 10, "loop/fid": 200.0}
    restored = asha()  # a restored sweep: Tune adds every trial again, the finished one included
    restored.on_trial_add(None, finished)
    restored.on_trial_add(None, finished)  # added twice: recorded once
    newcomer = trial("new", [])
    restored.on_trial_add(None, newcomer)
    assert restored.on_trial_result(None, newcomer, worse) == TrialScheduler.STOP
    forgetful = asha()  # what a plain ASHA would do after a restore: nothing to compare with
    forgetful.on_trial_add(None, SimpleNamespace(trial_id="new", path=None))
    assert forgetful.on_trial_result(None, SimpleNamespace(trial_id="new", path=None), worse) == TrialScheduler.CONTINUE


def test_the_report_after_a_tracking_outage_comes_from_what_the_trial_measured(
    ray_session, digits, eval_cache, tmp_path, capsys
):
    """The server dies after the trial's first checkpoint and stays down to the end: the scores wait in the
    trial's pending folder, the report cannot be written (exit 1, the table printed from the trial's results).
    With the server back, the same command delivers what was kept and then reports the trial completed, with the
    best FID it measured."""
    server = TrackingServer(tmp_path)
    server.start()
    args = sweep_args(digits, tmp_path, "outage", f"mlflow.tracking_uri={server.uri}", cache=eval_cache)

    def kill_after_first_checkpoint():
        deadline = time.time() + 300
        while not list((tmp_path / "runs").glob("outage/train/*/checkpoint_*")) and time.time() < deadline:
            time.sleep(0.2)
        server.kill()

    thread = threading.Thread(target=kill_after_first_checkpoint)
    thread.start()
    try:
        assert main(args) == 1
        thread.join()
        out, err = capsys.readouterr()
        assert "the sweep ran, but its report could not be written" in err and "| completed |" in out, out + err
        fids = {}  # what the trial measured, as Tune recorded it
        for line in next((tmp_path / "runs").glob("outage/trial-*/result.json")).read_text().splitlines():
            result = json.loads(line)
            if "loop/fid" in result:
                fids[result["step"]] = result["loop/fid"]
        assert sorted(fids) == [10, 20] and f"{min(fids.values()):.4g} |" in out

        server.start()
        assert main(args) == 0
        client = mlflow.MlflowClient(server.uri)
        exp = client.get_experiment_by_name("sagan-tune")
        runs = client.search_runs([exp.experiment_id], "tags.`sagan.sweep` = 'outage'")
        (parent,) = [r for r in runs if r.data.tags[ROLE_TAG] == "sweep"]
        (child,) = [r for r in runs if r.data.tags[ROLE_TAG] == "trial"]
        assert child.info.status == "FINISHED" and child.data.tags["sagan.stop_reason"] == "completed"
        history = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "loop/fid")}
        assert {s: v for s, v in history.items() if s} == fids  # delivered before the report was written
        assert parent.info.status == "FINISHED" and parent.data.metrics["best_loop_fid"] == min(fids.values())
        assert "| completed |" in parent.data.tags["mlflow.note.content"]
        assert not list((tmp_path / "runs").glob("outage/train/*/mlflow-pending/*.jsonl"))
    finally:
        thread.join()
        server.kill()
