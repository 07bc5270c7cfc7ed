"""MLflow never stops training: an unreachable or killed tracking server costs no step and loses no point."""

import threading
import time

import mlflow
import numpy as np

from pipelines.replay_tracking import main as replay_main
from pipelines.tracking.outbox import Outbox
from pipelines.tracking.pending import replay
from pipelines.tracking.store import absolute_tracking_uri, default_tracking_uri, prepare_tracking, refused_everything
from tests.servers import TrackingServer

UNREACHABLE = "http://127.0.0.1:9"


def new_run(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = prepare_tracking(store, "sagan-train")
    return store, mlflow.MlflowClient(store).create_run(experiment).info.run_id


def test_outbox_calls_return_at_once_while_the_store_is_unreachable(tmp_path):
    store, run_id = new_run(tmp_path)
    outbox = Outbox(UNREACHABLE, run_id, tmp_path / "pending")
    start = time.perf_counter()
    for step in range(1, 51):
        outbox.metrics({"d_loss": step / 10}, step)
    outbox.image(np.zeros((8, 8, 3), np.uint8), "samples", 50)
    outbox.terminate("FINISHED")
    assert time.perf_counter() - start < 0.5  # queued, not sent: the loop never waits on MLflow
    assert outbox.close(timeout=1) == 52
    assert (tmp_path / "pending" / f"{run_id}.jsonl").is_file()


def test_kept_items_replay_into_the_run_in_order_then_disappear(tmp_path, capsys):
    store, run_id = new_run(tmp_path)
    outbox = Outbox(UNREACHABLE, run_id, tmp_path / "run" / "mlflow-pending")
    for step in (2, 4, 6):
        outbox.metrics({"d_loss": step / 10, "g_loss": -step}, step)
    outbox.tags({"speed.compile": "False"})
    outbox.image(np.full((8, 8, 3), 200, np.uint8), "samples", 6)
    outbox.terminate("FINISHED")
    assert outbox.close(timeout=1) == 6
    assert replay_main([str(tmp_path / "run"), "--tracking-uri", UNREACHABLE]) == 2  # checked first: one line
    assert "did not answer" in capsys.readouterr().err
    assert replay(tmp_path / "run" / "mlflow-pending", tracking_uri=store) == (6, 0, 0)
    assert not (tmp_path / "run" / "mlflow-pending").exists()
    client = mlflow.MlflowClient(store)
    history = client.get_metric_history(run_id, "d_loss")
    assert [(m.step, m.value) for m in history] == [(2, 0.2), (4, 0.4), (6, 0.6)]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["speed.compile"] == "False"
    assert any("samples" in a.path for a in client.list_artifacts(run_id, "images"))
    assert replay_main([str(tmp_path / "run")]) == 0  # nothing left: says so
    assert "nothing to deliver" in capsys.readouterr().out


def test_replay_takes_the_local_pending_cache_of_a_remote_run_as_it_is_named(tmp_path, capsys):
    """A run on object storage keeps its pending items in ~/.cache/sagan/mlflow-pending/<run name>/ (no
    mlflow-pending/ inside it): the folder the warning names is the one the script replays."""
    store, run_id = new_run(tmp_path)
    outbox = Outbox(UNREACHABLE, run_id, tmp_path / "cache" / "r1")
    outbox.metrics({"d_loss": 0.5}, 3)
    assert outbox.close(timeout=1) == 1
    assert replay_main([str(tmp_path / "cache" / "r1"), "--tracking-uri", store]) == 0
    assert "delivered 1 item(s)" in capsys.readouterr().out
    assert [m.step for m in mlflow.MlflowClient(store).get_metric_history(run_id, "d_loss")] == [3]


def test_replay_keeps_what_it_could_not_deliver(tmp_path):
    _, run_id = new_run(tmp_path)
    outbox = Outbox(UNREACHABLE, run_id, tmp_path / "pending")
    outbox.metrics({"d_loss": 1.0}, 1)
    outbox.close(timeout=0.5)
    assert replay(tmp_path / "pending") == (0, 0, 1)  # the store it names is still down
    assert (tmp_path / "pending" / f"{run_id}.jsonl").is_file()


# ---------------------------------------------------------------- a real tracking server, killed mid-run


def test_a_tracking_server_killed_and_restarted_mid_run_costs_no_step_and_no_point(
    ray_session, digits, tmp_path, capsys
):
    from pipelines.train import main

    server = TrackingServer(tmp_path)
    server.start()
    run_dir = tmp_path / "runs" / "outage"
    args = [
        f"data.train_shards={digits / 'train'}",
        f"run.storage_path={tmp_path / 'runs'}",
        "run.name=outage",
        f"mlflow.tracking_uri={server.uri}",
        "model.ch=8",
        "train.batch_size=4",
        "train.steps=30",
        "train.log_every=2",
        "train.ckpt_every=10",
        "train.sample_every=10",
        "train.eval_every=0",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=0.5",
    ]
    outage = {}

    def outage_during_training():
        deadline = time.time() + 300
        while not list(run_dir.glob("checkpoint_*")) and time.time() < deadline:
            time.sleep(0.2)
        server.kill()  # after the first checkpoint: rank 0 is logging
        outage["killed_at"] = len(list(run_dir.glob("checkpoint_*")))
        time.sleep(3)  # down for this and the seconds the restart takes, while the steps after the first checkpoint run
        server.start()

    thread = threading.Thread(target=outage_during_training)
    thread.start()
    try:
        try:
            assert main(args) == 0
        finally:
            thread.join()
        # A run that outlasted the outage delivered everything; read what the restarted server holds.
        client = mlflow.MlflowClient(server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("sagan-train").experiment_id])
        assert run.info.status == "FINISHED"
        steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "d_loss")})
        assert steps == list(range(2, 31, 2))  # every logged step, the ones during the outage too
        grids = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
        assert sum("samples" in a for a in grids) >= 3  # steps 10, 20 and 30
    finally:
        server.kill()
    assert not (run_dir / "mlflow-pending").exists()


def test_an_item_the_store_refuses_is_set_aside_and_the_rest_go_on(tmp_path):
    store, run_id = new_run(tmp_path)
    outbox = Outbox(store, run_id, tmp_path / "pending")
    outbox.tags({"x" * 300: "a key longer than MLflow's 250 characters"})  # refused for good, not an outage
    for step in (1, 2):
        outbox.metrics({"d_loss": float(step)}, step)
    assert outbox.close(timeout=20) == 0
    client = mlflow.MlflowClient(store)
    assert [m.step for m in client.get_metric_history(run_id, "d_loss")] == [1, 2]
    (rejected,) = (tmp_path / "pending").glob("rejected-*.txt")
    assert "tags" in rejected.read_text()


def test_damaged_pending_files_do_not_stop_a_replay(tmp_path, capsys, caplog):
    store, run_id = new_run(tmp_path)
    outbox = Outbox(UNREACHABLE, run_id, tmp_path / "pending")
    outbox.metrics({"d_loss": 1.0}, 1)
    outbox.image(np.zeros((8, 8, 3), np.uint8), "samples", 1)
    outbox.metrics({"d_loss": 2.0}, 2)
    outbox.close(timeout=0.5)
    pending = tmp_path / "pending" / f"{run_id}.jsonl"
    next(pending.parent.glob("*.png")).unlink()  # an image lost
    pending.write_text(pending.read_text() + '{"kind": "metrics", "values": {"d_lo')  # a spill cut short
    (pending.parent / "x.png.tmp").write_bytes(b"")
    assert replay_main([str(pending.parent), "--tracking-uri", store]) == 0
    out = capsys.readouterr().out  # 2 delivered, 2 set aside: the item whose image was lost, the line cut short
    assert f"delivered 2 item(s) from 1 file(s) in {pending.parent}; 2 set aside" in out, out
    warnings = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert len(warnings) == 2 and "a pending image of run" in warnings[0] and "a pending line of run" in warnings[1]
    assert not any("None" in w for w in warnings), warnings
    assert [m.value for m in mlflow.MlflowClient(store).get_metric_history(run_id, "d_loss")] == [1.0, 2.0]
    assert [p.name for p in pending.parent.iterdir()] == [f"rejected-{run_id}.txt"]


def test_a_relative_tracking_uri_is_made_absolute_on_the_driver(tmp_path, monkeypatch):
    """Ray's workers run in another directory: a relative sqlite file or folder would name another store there."""
    from pipelines.common.config import load_config
    from pipelines.training.preflight import resolve_paths

    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///rel.db") == f"sqlite:///{tmp_path / 'rel.db'}"
    assert absolute_tracking_uri("sqlite:///sub/../rel.db") == f"sqlite:///{tmp_path / 'rel.db'}"
    assert absolute_tracking_uri("mlruns") == str(tmp_path / "mlruns")
    for kept in ("sqlite:////abs/m.db", "http://127.0.0.1:5000", "databricks", "file:///abs/mlruns"):
        assert absolute_tracking_uri(kept) == kept
    cfg = resolve_paths(load_config(None, ["mlflow.tracking_uri=sqlite:///rel.db"]))
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'rel.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert default_tracking_uri() == f"sqlite:///{tmp_path / 'env.db'}"


def test_a_run_whose_every_item_was_refused_is_reported(tmp_path):
    """The driver's run in one store, rank 0's items sent to another that has no such run: all are refused."""
    store, run_id = new_run(tmp_path)
    elsewhere = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    (tmp_path / "other").mkdir()
    prepare_tracking(elsewhere, "sagan-train")
    pending = tmp_path / "run" / "mlflow-pending"
    outbox = Outbox(elsewhere, run_id, pending)
    outbox.metrics({"d_loss": 0.5}, 1)
    outbox.metrics({"d_loss": 0.4}, 2)
    outbox.close(timeout=10)
    message = refused_everything(store, run_id, pending)
    assert message and f"took no metric of run {run_id}" in message and "refused 2 item(s)" in message
    mlflow.MlflowClient(store).log_metric(run_id, "d_loss", 0.3, step=3)  # some arrived: warned one by one
    assert refused_everything(store, run_id, pending) is None
    assert refused_everything(store, run_id, tmp_path / "nothing-pending") is None


def test_replay_refuses_a_path_that_is_not_a_run_folder_and_names_its_own_flag(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"jpeg")
    for path in (tmp_path / "photos", tmp_path / "nowhere", tmp_path / "photos" / "cat.jpg"):
        assert replay_main([str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert "is not a run folder" in err and len(err.splitlines()) == 1, err
    (tmp_path / "run" / "mlflow-pending").mkdir(parents=True)
    (tmp_path / "run" / "mlflow-pending" / "r.jsonl").write_text("")
    assert replay_main([str(tmp_path / "run"), "--tracking-uri", UNREACHABLE]) == 2
    err = capsys.readouterr().err.strip()
    assert "give --tracking-uri" in err and "mlflow.tracking_uri" not in err
