"""pipelines/evaluate.py end to end, and in-loop FID in the Ray training loop."""

import json
import socket
from pathlib import Path

import mlflow
import pytest
import torch

import pipelines.evaluate as evaluate
import sagan.inception as inception
from pipelines.common.config import load_config
from pipelines.evaluate import main
from pipelines.tracking.store import prepare_tracking
from pipelines.training.preflight import prepare_evaluation, resolve_paths
from pipelines.training.trainer import build_trainer
from sagan.checkpoint import load_checkpoint, save_checkpoint
from sagan.models import build_models
from sagan.step import Trainer


def base_overrides(digits, eval_cache, tmp_path):
    return [
        f"data.train_shards={digits / 'train'}",
        f"data.val_shards={digits / 'val'}",
        f"eval.cache_dir={eval_cache}",
        "eval.feature_extractor=sample-classifier",
        "eval.batch_size=64",
        f"run.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "model.ch=8",
        "train.batch_size=4",
    ]


def offline_checkpoint(digits, eval_cache, tmp_path, extra=None) -> Path:
    """A step-0 checkpoint written without Ray (no MLflow run unless `extra` names one)."""
    cfg = load_config(None, base_overrides(digits, eval_cache, tmp_path))
    torch.manual_seed(0)
    G, D = build_models(cfg.model)
    return save_checkpoint(tmp_path / "ckpt" / "checkpoint.pt", Trainer(G, D, cfg), cfg, extra=extra)


def test_in_loop_fid_and_the_eval_job_land_in_the_training_run(ray_session, digits, eval_cache, tmp_path, capsys):
    cfg = load_config(
        None,
        [
            *base_overrides(digits, eval_cache, tmp_path),
            "run.name=evaluated",
            "train.steps=4",
            "train.log_every=2",
            "train.ckpt_every=4",
            "train.sample_every=4",
            "train.eval_every=2",
            "eval.loop_samples=40",
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=0.5",
        ],
    )
    cfg = resolve_paths(cfg)
    prepare_evaluation(cfg)  # the driver's Ray task that fills the eval cache before workers start
    assert list(eval_cache.glob("sample-classifier-*.pt")) and list(
        eval_cache.glob("fid-stats-sample-classifier-32px-*.pt")
    )
    prepare_tracking(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    result = build_trainer(cfg, cfg.mlflow.tracking_uri).fit()
    assert result.metrics["step"] == 4 and result.metrics["loop/fid"] > 0 and 0 <= result.metrics["loop/class_acc"] <= 1

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name("sagan-train")
    (run,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'evaluated'")
    run_id = run.info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "loop/fid")] == [0, 2, 4]
    assert "loop_fid.png" in [Path(a.path).name for a in client.list_artifacts(run_id, "plots")]
    best = Path(cfg.run.storage_path) / "evaluated" / "best"  # kept beside Ray's latest N, by in-loop FID
    fids = {m.step: m.value for m in client.get_metric_history(run_id, "loop/fid") if m.step}
    info = json.loads((best / "best.json").read_text())
    assert info["step"] == min(fids, key=fids.get) and info["loop/fid"] == pytest.approx(fids[info["step"]])
    assert load_checkpoint(best / "checkpoint.pt")["step"] == info["step"]

    args = ["--checkpoint", str(Path(cfg.run.storage_path) / "evaluated"), "eval.num_samples=60"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"logged to MLflow run {run_id}" in out
    (scores,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    (fid,) = client.get_metric_history(run_id, "eval/fid")
    assert fid.step == 4 and fid.value == pytest.approx(scores["fid"])
    (acc,) = client.get_metric_history(run_id, "eval/class_acc")
    assert acc.step == 4 and 0 <= acc.value <= 1
    params = client.get_run(run_id).data.params
    assert params["eval_step_4.num_samples"] == "60" and params["eval_step_4.generator"] == "ema"
    assert params["eval.num_samples"] == "50000"  # the training config's own param is untouched
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert any("eval_samples" in a for a in images)
    (entry,) = client.list_artifacts(run_id, "evaluations")
    assert Path(entry.path).name.startswith("step_000004-")
    record = json.loads(Path(client.download_artifacts(run_id, entry.path, str(tmp_path))).read_text())
    assert record["settings"]["num_samples"] == 60 and record["scores"]["fid"] == pytest.approx(scores["fid"])

    # The same step again with other settings: a second record, the params keep the first evaluation's.
    assert main([*args[:2], "eval.num_samples=30"]) == 0
    assert "evaluated before with other settings" in capsys.readouterr().out
    assert len(client.list_artifacts(run_id, "evaluations")) == 2
    assert client.get_run(run_id).data.params["eval_step_4.num_samples"] == "60"


def test_a_checkpoint_without_a_run_gets_a_new_run_tagged_with_it(digits, eval_cache, tmp_path, capsys):
    ckpt = offline_checkpoint(digits, eval_cache, tmp_path)
    assert main(["--checkpoint", str(ckpt), "eval.num_samples=30"]) == 0
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sagan-eval")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["checkpoint"] == str(ckpt.resolve())
    assert run.data.params["eval.num_samples"] == "30"
    (fid,) = client.get_metric_history(run.info.run_id, "eval/fid")
    assert fid.step == 0 and fid.value > 0


def test_offline_without_inception_weights_fails_before_generating(digits, eval_cache, tmp_path, capsys, monkeypatch):
    ckpt = offline_checkpoint(digits, eval_cache, tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with socket.socket() as s:  # a port nobody listens on: the download fails at once, as offline
        s.bind(("127.0.0.1", 0))
        monkeypatch.setattr(inception, "INCEPTION_URL", f"http://127.0.0.1:{s.getsockname()[1]}/w.pth")
    monkeypatch.setattr(evaluate, "build_evaluator", lambda *a, **k: pytest.fail("statistics read before the error"))
    assert main(["--checkpoint", str(ckpt), "eval.feature_extractor=inception-v3-compat"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no Inception weights") and "--inception-weights" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "{tmp}/nowhere"], "no checkpoint at"),
        (["--checkpoint", "{ckpt}", "model.ch=16"], "override model.ch=16 is not allowed"),
        (["--checkpoint", "{ckpt}", "eval.num_samples=5"], "eval.num_samples: must be at least 10"),
        (["--checkpoint", "{ckpt}", "eval.feature_extractor=vgg"], "eval.feature_extractor: 'vgg' is not one of"),
        (["--checkpoint", "{ckpt}", "data.val_shards={tmp}/none"], "real images for FID"),
        (
            ["--checkpoint", "{ckpt}", "eval.real_split=train", "data.train_shards={shards64}"],
            "but the model makes 10 at 32px",
        ),
        (["--checkpoint", "{ckpt}", "--run-id", "0123456789abcdef"], "MLflow run 0123456789abcdef is not in"),
        (["--checkpoint", "{ckpt}", "--device", "tpu"], "--device tpu is not one of"),
        (["--checkpoint", "{ckpt}", "--register", ""], "--register '' is not a usable model name"),
        (
            ["--checkpoint", "{ckpt}", "mlflow.tracking_uri=http://127.0.0.1:9"],
            "MLflow tracking server http://127.0.0.1:9 did not answer within 5s",
        ),
        (
            ["--checkpoint", "{ckpt}", "mlflow.tracking_uri=sqlite:///{tmp}/notes.txt"],
            "is not a usable sqlite database",
        ),
        (["--checkpoint", "{ckpt}", "--stats-file", "{tmp}/notes.txt"], "is not a statistics file (UnpicklingError)"),
        (
            ["--checkpoint", "{ckpt}", "--stats-file", "{tmp}/not-stats.pt"],
            "is not a statistics file (it lacks sigma, key, num_samples)",
        ),
        (["--checkpoint", "{ckpt}", "--stats-file", "{tmp}/nope/stats.pt"], "the folder {tmp}/nope does not exist"),
        (["--checkpoint", "{misfit}"], "G_ema.linear.bias has shape (512,) but the model's has (1024,)"),
    ],
)
def test_bad_input_is_one_line_before_any_sample(digits, eval_cache, tmp_path, capsys, monkeypatch, args, message):
    ckpt = offline_checkpoint(digits, eval_cache, tmp_path)
    monkeypatch.setattr(evaluate, "build_evaluator", lambda *a, **k: pytest.fail("statistics read before the error"))
    (tmp_path / "notes.txt").write_text("not a database, nor statistics\n" * 10)
    torch.save({"mu": torch.zeros(3)}, tmp_path / "not-stats.pt")
    state = torch.load(ckpt, weights_only=True)  # a checkpoint whose saved config does not fit its weights
    state["config"]["model"]["ch"] = 16
    misfit = tmp_path / "misfit" / "checkpoint.pt"
    misfit.parent.mkdir()
    torch.save(state, misfit)
    shards64 = tmp_path / "digits64"
    if any("shards64" in a for a in args):  # the same digits sharded at another size
        from preprocessing.shard_imagenet import main as shard_main

        assert (
            shard_main(
                ["--src", str(digits.parent / "raw"), "--out", str(shards64), "--size", "64", "--shard-size", "2000"]
            )
            == 0
        )
        capsys.readouterr()  # the sharding's own progress output
    assert main([a.format(tmp=tmp_path, ckpt=ckpt, shards64=shards64 / "train", misfit=misfit) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(tmp=tmp_path) in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("damage, classifier_cached", [("overwritten", True), ("truncated", False)])
def test_a_damaged_val_shard_is_one_line_when_statistics_are_computed(
    digits, eval_cache, tmp_path, capsys, damage, classifier_cached
):
    """Real statistics not cached yet: a val shard overwritten in place or cut short, with the sample classifier
    cached or trained first; exit 2, one line naming the shard."""
    import shutil
    import tarfile

    data = tmp_path / "digits"
    shutil.copytree(digits, data)
    shard = sorted((data / "val").glob("*.tar"))[0]
    if damage == "overwritten":  # an image's bytes overwritten in place: the size still matches the manifest
        with tarfile.open(shard) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        with open(shard, "r+b") as f:
            f.seek(member.offset_data)
            f.write(b"\0" * member.size)
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cache = tmp_path / "cache"
    cache.mkdir()
    for classifier in eval_cache.glob("sample-classifier-*.pt") if classifier_cached else ():
        shutil.copy(classifier, cache)  # the train shards are intact: no retraining
    ckpt = offline_checkpoint(digits, eval_cache, tmp_path)
    args = ["--checkpoint", str(ckpt), f"data.val_shards={data / 'val'}", f"eval.cache_dir={cache}"]
    assert main([*args, "eval.num_samples=30"]) == 2
    err = capsys.readouterr().err  # MLflow's store and the progress bar write here too
    error = err.strip().splitlines()[-1].split("error: ", 1)[-1]
    assert err.count("error: ") == 1 and shard.name in error and "Traceback" not in err, err


def test_a_shard_altered_in_place_is_refused_even_when_its_statistics_are_cached(digits, eval_cache, tmp_path, capsys):
    """The real statistics are cached under the manifest's hashes: bytes that no longer match them must not be
    scored against that entry (exit 0, a wrong FID) nor summarised into it."""
    import shutil
    import tarfile

    data = tmp_path / "digits"
    shutil.copytree(digits, data)
    cache = tmp_path / "cache"
    cache.mkdir()
    for classifier in eval_cache.glob("sample-classifier-*.pt"):
        shutil.copy(classifier, cache)
    ckpt = offline_checkpoint(digits, eval_cache, tmp_path)
    args = ["--checkpoint", str(ckpt), f"data.val_shards={data / 'val'}", f"eval.cache_dir={cache}"]
    assert main([*args, "eval.num_samples=30"]) == 0  # clean data: statistics computed and cached
    (stats,) = cache.glob("fid-stats-*.pt")
    cached = stats.read_bytes()
    shard = sorted((data / "val").glob("*.tar"))[-1]
    with tarfile.open(shard) as tar:  # one image's bytes altered in place: the size still matches the manifest
        member = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-1]
    with open(shard, "r+b") as f:
        f.seek(member.offset_data + member.size // 2)
        f.write(b"\xff\x00\xff\x00")
    capsys.readouterr()
    assert main([*args, "eval.num_samples=30"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: real images for FID") and shard.name in err and "sha256" in err, err
    assert stats.read_bytes() == cached and len(list(cache.glob("fid-stats-*.pt"))) == 1  # the cache is untouched
