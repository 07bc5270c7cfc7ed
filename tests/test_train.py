"""The Ray Train pipeline on a local Ray instance: 2 CPU workers, a tiny model, a few steps."""

import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch

from pipelines.common.config import load_config
from pipelines.tracking.store import prepare_tracking
from pipelines.train import main
from pipelines.training.preflight import resolve_paths
from pipelines.training.trainer import build_trainer
from sagan.checkpoint import load_checkpoint
from sagan.data import batches_per_epoch, find_shards
from sagan.loader import rank_batches


def tiny_cfg(digits, tmp_path, *overrides):
    cfg = load_config(
        None,
        [
            f"data.train_shards={digits / 'train'}",
            f"run.storage_path={tmp_path / 'runs'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "model.ch=8",
            "train.batch_size=4",
            "train.log_every=2",
            "train.ckpt_every=2",
            "train.sample_every=4",
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=0.5",
            *overrides,
        ],
    )
    prepare_tracking(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    return resolve_paths(cfg)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def fit(cfg):
    return build_trainer(cfg, cfg.mlflow.tracking_uri).fit()


def mlflow_run(cfg):
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    (run,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{cfg.run.name}'")
    return client, run


def test_ddp_training_keeps_ranks_identical_and_reports_and_a_rerun_with_same_name_resumes_with_optimizer_state(
    ray_session, digits, tmp_path
):
    # One run launched twice under one name (2 steps, then on to 4): what a DDP run reports, and the resume.
    # Each launch costs a Ray Train start (controller, workers, process group), so both are checked on one run.
    first = fit(tiny_cfg(digits, tmp_path, "train.steps=2", "run.name=ddp"))
    assert first.metrics["step"] == 2
    assert first.metrics["rank_param_spread"] == 0.0
    cfg = tiny_cfg(digits, tmp_path, "train.steps=4", "run.name=ddp")
    result = fit(cfg)
    assert result.metrics["step"] == 4
    assert result.metrics["rank_param_spread"] == 0.0
    state = load_checkpoint(Path(result.checkpoint.path) / "checkpoint.pt")
    assert state["step"] == 4
    # Adam's step count continues from the first run: the optimizer state was restored, not rebuilt.
    assert all(s["step"].item() == 4 for s in state["opt_d"]["state"].values())
    client, run = mlflow_run(cfg)  # one MLflow run across both launches
    assert run.data.params["model.ch"] == "8" and run.data.params["optim.lr_d"] == "0.0004"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "d_loss")] == [2, 4]
    assert "images_per_s" in run.data.metrics and "gamma/G_block1" in run.data.metrics
    assert state["extra"]["mlflow_run_id"] == run.info.run_id
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("samples" in a for a in artifacts) and any("attention_16" in a for a in artifacts)
    assert run.data.tags["checkpoint_location"].endswith("/ddp")


def test_killed_worker_restarts_from_last_checkpoint(ray_session, digits, tmp_path):
    from ray.util.state import list_actors

    cfg = tiny_cfg(digits, tmp_path, "train.steps=30", "train.ckpt_every=4", "run.name=fault", "run.max_failures=2")
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", fit(cfg)))
    thread.start()
    run_dir = Path(cfg.run.storage_path) / "fault"
    deadline = time.time() + 240
    while not checkpoint_dirs(run_dir) and time.time() < deadline:
        time.sleep(0.5)
    assert checkpoint_dirs(run_dir), "no checkpoint appeared"
    address = ray_session.get_runtime_context().gcs_address  # this session's Ray, not any other on the host
    workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    os.kill(workers[-1].pid, signal.SIGKILL)
    thread.join(timeout=400)
    result = out["result"]
    assert result.metrics["step"] == 30
    assert load_checkpoint(Path(result.checkpoint.path) / "checkpoint.pt")["step"] == 30
    _, run = mlflow_run(cfg)  # the retry logged into the same MLflow run, which ended FINISHED
    assert run.info.status == "FINISHED"


def test_every_rank_gets_the_same_number_of_batches_with_true_labels(digits):
    shards = find_shards(str(digits / "train"))
    n = batches_per_epoch(shards, 2, 16)
    wnid_of = dict(line.split("\t")[:2] for line in (digits / "classes.tsv").read_text().splitlines())
    for epoch in (0, 1):
        counts = []
        for rank in (0, 1):
            batches = list(rank_batches(shards, rank, 2, 16, epoch))
            counts.append(len(batches))
            for x, y in batches:
                assert x.shape == (16, 3, 32, 32) and -1 <= x.min() and x.max() <= 1
                assert y.dtype == torch.long and 0 <= y.min() and y.max() < 10
        assert counts == [n, n]
    import webdataset as wds

    for sample in wds.WebDataset(shards.urls[0], shardshuffle=False).decode():
        assert (
            wnid_of[sample["cls"].decode() if isinstance(sample["cls"], bytes) else str(sample["cls"])]
            == sample["json"]["wnid"]
        )


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.train_shards=", "no shard location given"),
        ("data.train_shards={empty}", "no manifest.json"),
        ("data.train_shards={digits}/train/imagenet32-train-{{000100..000101}}.tar", "matches no file"),
        ("model.num_classes=1000", "the shards hold 10 classes but model.num_classes is 1000"),
        ("model.resolution=64", "the shards hold 32px images"),
        ("scaling.cpus_per_worker=16", "the cluster has"),
        ("scaling.use_gpu=true", "GPU(s)"),
        ("model.g_attn=[4]", r"model.g_attn has no [4]"),
        ("run.storage_path=/proc/nope", "is not writable"),
        ("data.val_shards={empty}/val", "real images for FID (data.val_shards): "),  # the demo config's in-loop FID
        # Raised in the Ray task that fills the eval cache, reported as one line all the same.
        ("eval.feature_extractor=inception-v3-compat eval.inception_weights={empty}/w.pth", "Inception weights"),
    ],
)
def test_bad_input_fails_before_any_worker(ray_session, digits, tmp_path, capsys, override, message):
    (tmp_path / "empty").mkdir()
    args = [
        f"data.train_shards={digits / 'train'}",
        f"data.val_shards={digits / 'val'}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        f"eval.cache_dir={tmp_path / 'cache'}",
        *override.format(digits=digits, empty=tmp_path / "empty").split(),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs" / "sagan-demo").exists()


def test_non_finite_loss_stops_the_run_naming_the_step(ray_session, digits, tmp_path, capsys):
    cfg = tiny_cfg(digits, tmp_path, "run.name=nan", "train.steps=2", "train.ckpt_every=1")
    fit(cfg)  # two good steps, checkpointed
    good = checkpoint_dirs(Path(cfg.run.storage_path) / "nan")[-1]
    before = (good / "checkpoint.pt").read_bytes()
    args = [
        f"data.train_shards={digits / 'train'}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
        "model.ch=8",
        "train.batch_size=4",
        "run.name=nan",
        "train.steps=20",
        "train.ckpt_every=1",
        "optim.lr_d=1e30",
        "optim.lr_g=1e30",
        "run.max_failures=1",
        "train.eval_every=0",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: non-finite loss at step ") and "the last good checkpoint is kept" in err
    step = int(err.split("at step ")[1].split()[0])
    assert step > 2
    assert (good / "checkpoint.pt").read_bytes() == before
    latest = checkpoint_dirs(Path(cfg.run.storage_path) / "nan")[-1]
    assert load_checkpoint(latest / "checkpoint.pt")["step"] == step - 1  # nothing saved at or after it
    _, run = mlflow_run(cfg)  # one MLflow run for both launches and the retry, marked failed
    assert run.info.status == "FAILED"


def test_finite_divergence_stops_the_run_and_keeps_the_checkpoints_from_before_it(
    ray_session, digits, tmp_path, capsys
):
    cfg = tiny_cfg(digits, tmp_path, "run.name=diverge", "train.steps=4")
    fit(cfg)  # healthy: checkpoints at steps 2 and 4
    args = [
        f"data.train_shards={digits / 'train'}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
        "model.ch=8",
        "train.batch_size=4",
        "run.name=diverge",
        "train.steps=40",
        "train.log_every=2",
        "train.ckpt_every=2",
        "train.sample_every=100",
        "optim.lr_d=1e6",
        "optim.lr_g=1e6",
        "train.eval_every=0",
        "train.diverge_patience=3",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: diverged at step 6: ") and "for 3 readings to step 10" in err
    steps = [
        load_checkpoint(d / "checkpoint.pt")["step"] for d in checkpoint_dirs(Path(cfg.run.storage_path) / "diverge")
    ]
    assert steps == [2, 4]  # keep_checkpoints=2: nothing from the diverging steps pushed them out
    assert main(args) == 1  # a relaunch does not replay it
    assert "diverged at step 6" in capsys.readouterr().err


@pytest.mark.parametrize("entry", ["train", "tune"])
def test_unreachable_tracking_server_is_one_line_within_seconds_before_ray(entry, tmp_path, capsys):
    import importlib

    main_of = importlib.import_module(f"pipelines.{entry}").main
    start = time.perf_counter()
    assert main_of([f"run.storage_path={tmp_path / 'runs'}", "mlflow.tracking_uri=http://127.0.0.1:9"]) == 2
    assert time.perf_counter() - start < 15  # MLflow's own retries take minutes
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: MLflow tracking server http://127.0.0.1:9 did not answer within 5s")
        and len(err.splitlines()) == 1
    )
    assert "mlflow.tracking_uri" in err and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "store, message",
    [
        ("nope/mlflow.db", "the folder {tmp}/nope does not exist"),
        ("notes.txt", "{tmp}/notes.txt is not a usable sqlite database (file is not a database)"),
        (".", "is a folder, not a database file"),
    ],
)
def test_a_sqlite_store_that_cannot_be_one_is_one_line_before_ray(tmp_path, capsys, monkeypatch, store, message):
    import pipelines.train as train

    monkeypatch.setattr(train, "launch", lambda cfg: pytest.fail("Ray was started before the store was checked"))
    (tmp_path / "notes.txt").write_text("not a database, but a text file long enough to have a header\n" * 10)
    assert main([f"mlflow.tracking_uri=sqlite:///{(tmp_path / store).resolve()}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(tmp=tmp_path) in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.train_shards={tmp}/none", "does not exist"),
        ("model.num_classes=7", "the shards hold 10 classes"),
        ("run.storage_path=/proc/nope", "is not writable"),
        (
            "data.cache_dir=s3://bucket/cache",
            "data.cache_dir=s3://bucket/cache is a URL; it must be a folder on each node",
        ),
        (
            "scaling.num_workers=[2,1]",
            "scaling.num_workers: [2, 1] is neither a number of workers (1 or more) nor [MIN, MAX] with 1 <= MIN <= MAX",
        ),
    ],
)
def test_input_checks_come_before_ray_starts(digits, tmp_path, capsys, monkeypatch, override, message):
    import pipelines.train as train

    monkeypatch.setattr(train, "launch", lambda cfg: pytest.fail("Ray was started before the inputs were checked"))
    args = [
        f"data.train_shards={digits / 'train'}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        "train.eval_every=0",
        override.format(tmp=tmp_path),
    ]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_a_multi_node_cluster_is_warned_of_what_its_nodes_cannot_share(tmp_path):
    from pipelines.training.preflight import multinode_warnings

    cfg = resolve_paths(load_config(None, [f"run.storage_path={tmp_path / 'runs'}"]))
    sqlite = f"sqlite:///{tmp_path / 'm.db'}"
    assert multinode_warnings(cfg, sqlite, nodes=1, submitted=False) == []  # a laptop
    store, storage = multinode_warnings(cfg, sqlite, nodes=2, submitted=True)
    assert store.startswith(f"MLflow store {sqlite} is a file on this node, but the cluster has 2 nodes")
    assert storage.startswith(f"run.storage_path {tmp_path / 'runs'} is a local path and the cluster has 2 nodes")
    cfg.run.storage_path = "s3://bucket/runs"
    assert multinode_warnings(cfg, "http://mlflow:5000", nodes=2, submitted=True) == []
    cfg.data.train_shards, cfg.train.eval_every = "s3://bucket/imagenet128/train", 1000  # in-loop FID, no cache
    (cache,) = multinode_warnings(cfg, "http://mlflow:5000", nodes=2, submitted=True)
    assert "set eval.cache_dir=s3://" in cache
    cfg.eval.cache_dir = "s3://bucket/eval-cache"
    assert multinode_warnings(cfg, "http://mlflow:5000", nodes=2, submitted=True) == []


@pytest.mark.parametrize("script", ["train", "tune"])
def test_print_config_prints_the_resolved_config_as_yaml_that_loads_back(script, tmp_path, capsys):
    import importlib

    module = importlib.import_module(f"pipelines.{script}")
    assert module.main(["--print-config", "model.ch=32", "optim.lr_d=3e-4"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    expected = resolve_paths(load_config(module.DEMO_CONFIG, ["model.ch=32", "optim.lr_d=3e-4"]))
    assert load_config(printed) == expected and expected.model.ch == 32
