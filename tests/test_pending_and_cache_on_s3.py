"""What a run on object storage keeps besides its checkpoints: MLflow items kept through an outage (in the run's
prefix, delivered from any machine) and the evaluation cache (eval.cache_dir=s3://..., mirrored on each node)."""

import mlflow
import numpy as np
import pytest

from pipelines.common.run_folder import RunFolder
from pipelines.replay_tracking import main as replay_main
from pipelines.tracking.kept import gather, keep, keep_safely, pending_here
from pipelines.tracking.outbox import Outbox
from sagan import cache_mirror
from tests.servers import objects, write_object
from tests.test_tracking import UNREACHABLE, new_run


def on_node(monkeypatch, tmp_path, name: str) -> None:
    """Act as another machine: its own ~/.cache/sagan (XDG_CACHE_HOME)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / name))


def spill(run: RunFolder, run_id: str, steps: list[int], image: bool = False) -> None:
    outbox = Outbox(UNREACHABLE, run_id, run.pending)
    for step in steps:
        outbox.metrics({"d_loss": step / 10}, step)
    if image:
        outbox.image(np.full((8, 8, 3), 99, np.uint8), "samples", steps[-1])
    assert outbox.close(timeout=0.5) == len(steps) + image


def test_pending_items_of_a_run_on_s3_move_into_its_prefix_and_replay_from_any_machine(
    s3, tmp_path, monkeypatch, capsys
):
    store, run_id = new_run(tmp_path)
    run, prefix = RunFolder(f"{s3}/runs", "r1"), f"{s3}/runs/r1/mlflow-pending"
    on_node(monkeypatch, tmp_path, "node-a")  # rank 0 of a first launch
    spill(run, run_id, [2, 4], image=True)
    assert keep(run) == 2 and not run.pending.exists()  # the items file and the image, moved
    stored = objects(prefix)
    assert len(stored) == 2 and stored[0].endswith(".png")
    assert stored[1].startswith(f"{run_id}~") and stored[1].endswith(".jsonl")  # a part: objects are never rewritten
    on_node(monkeypatch, tmp_path, "node-b")  # rank 0 of the next launch, on another node
    spill(run, run_id, [6])
    assert keep(run) == 1
    parts = [k for k in objects(prefix) if k.endswith(".jsonl")]
    assert len(parts) == 2 and parts[0] == stored[1]  # the earlier part sorts first
    stored = objects(prefix)
    on_node(monkeypatch, tmp_path, "laptop")
    assert replay_main([f"{s3}/runs/r1", "--tracking-uri", UNREACHABLE]) == 2
    assert "did not answer" in capsys.readouterr().err
    assert objects(prefix) == stored  # a refused replay moves nothing
    assert replay_main([prefix, "--tracking-uri", store]) == 0
    out = capsys.readouterr().out
    assert f"delivered 4 item(s) from 1 file(s) in {prefix}" in out
    history = mlflow.MlflowClient(store).get_metric_history(run_id, "d_loss")
    assert [(m.step, m.value) for m in history] == [(2, 0.2), (4, 0.4), (6, 0.6)]
    assert any("samples" in a.path for a in mlflow.MlflowClient(store).list_artifacts(run_id, "images"))
    assert objects(prefix) == [] and not run.pending.exists()
    assert replay_main([f"{s3}/runs/r1"]) == 0 and "nothing to deliver" in capsys.readouterr().out


def eval_step(line: str) -> int:
    import json

    item = json.loads(line)
    return item.get("step", 0) if item["kind"] == "metrics" else 0


def test_what_the_store_does_not_take_stays_in_the_bucket(s3, tmp_path, monkeypatch, capsys):
    _, run_id = new_run(tmp_path)
    run = RunFolder(f"{s3}/runs", "r2")
    on_node(monkeypatch, tmp_path, "node-a")
    spill(run, run_id, [1, 2])
    keep(run)
    on_node(monkeypatch, tmp_path, "node-b")
    assert replay_main([f"{s3}/runs/r2"]) == 1  # the items' own store is still down
    assert "2 item(s) not delivered" in capsys.readouterr().err
    (kept,) = objects(f"{s3}/runs/r2/mlflow-pending")
    assert kept.startswith(f"{run_id}~") and not run.pending.exists()
    # the next delivery attempt finds them in the bucket and its own node's items after them
    spill(run, run_id, [3])
    assert [eval_step(line) for line in (gather(run) / f"{run_id}.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert objects(f"{s3}/runs/r2/mlflow-pending") == []


def test_replay_of_an_empty_prefix_or_a_bare_bucket_is_one_line(s3, capsys):
    for url in (f"{s3}/runs/none", s3):
        assert replay_main([url]) == 2
        err = capsys.readouterr().err.strip()
        assert "not a run folder" in err and len(err.splitlines()) == 1, err


def test_a_store_out_of_reach_leaves_the_items_on_the_node_with_a_warning(s3, tmp_path, monkeypatch, caplog):
    import sagan.storage

    _, run_id = new_run(tmp_path)
    run = RunFolder(f"{s3}/runs", "r3")
    on_node(monkeypatch, tmp_path, "node-a")
    spill(run, run_id, [1])
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the store is away
    monkeypatch.setattr(sagan.storage, "S3_ATTEMPTS", 1)  # and this test does not wait out its retries
    keep_safely(run)  # a warning, not an error: a run's outcome is not the store's
    assert (run.pending / f"{run_id}.jsonl").is_file()
    assert f"they stay in {run.pending} on this node" in caplog.text
    with pending_here(run) as local:  # the driver's delivery: what is here, and a warning for the bucket
        assert (local / f"{run_id}.jsonl").is_file()
    assert "could not read the kept MLflow items" in caplog.text


def test_an_eval_cache_on_s3_is_filled_by_one_node_and_read_by_another(s3, tmp_path, monkeypatch):
    url = f"{s3}/eval-cache"
    on_node(monkeypatch, tmp_path, "node-a")
    local = cache_mirror.pull(url)
    assert local.is_dir() and not any(local.iterdir())
    (local / "fid-stats-x-32px-0123.pt").write_bytes(b"statistics")
    (local / ".fid-stats-y.pt.tmp-9").write_bytes(b"half")  # a write in progress: not published
    cache_mirror.push(url)
    assert objects(url) == ["fid-stats-x-32px-0123.pt"]
    on_node(monkeypatch, tmp_path, "node-b")
    other = cache_mirror.pull(url)
    assert other != local and (other / "fid-stats-x-32px-0123.pt").read_bytes() == b"statistics"
    write_object(f"{url}/fid-stats-x-32px-0123.pt", b"statistics, rewritten")  # another size: fetched again
    assert (cache_mirror.pull(url) / "fid-stats-x-32px-0123.pt").read_bytes() == b"statistics, rewritten"


@pytest.mark.parametrize("key", ["data.cache_dir"])
def test_a_url_as_the_loaders_local_cache_is_one_line(s3, digits, tmp_path, capsys, key):
    from pipelines.train import main

    args = [f"data.train_shards={digits / 'train'}", f"run.storage_path={tmp_path}", f"{key}={s3}/cache"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{key}={s3}/cache is a URL" in err
