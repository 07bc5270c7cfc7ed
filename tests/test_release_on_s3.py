"""Evaluating and sampling a checkpoint on object storage, with the real images on it too, against a real S3
server on 127.0.0.1 (moto): the same scores and images as from a local copy, messages naming the URL."""

import mlflow
import numpy as np
import pytest

from pipelines.evaluate import main as evaluate
from pipelines.sample import main as sample
from tests.servers import objects, read_object, upload, write_object
from tests.test_evaluate import offline_checkpoint
from tests.test_sample import images_in


def test_a_checkpoint_and_real_images_on_s3_score_as_their_local_copies(s3, digits, eval_cache, tmp_path):
    ckpt = offline_checkpoint(digits, eval_cache, tmp_path)  # tmp_path/ckpt/checkpoint.pt
    upload(digits, f"{s3}/digits")
    upload(ckpt.parent, f"{s3}/runs/r1/checkpoint_000001")
    scores = {}
    for where, spec, val in (
        ("disk", str(ckpt), str(digits / "val")),
        ("s3", f"{s3}/runs/r1", f"{s3}/digits/val"),  # a run prefix: its newest checkpoint
    ):
        uri = f"sqlite:///{tmp_path / f'{where}.db'}"
        assert (
            evaluate(
                ["--checkpoint", spec, "eval.num_samples=30", f"data.val_shards={val}", f"mlflow.tracking_uri={uri}"]
            )
            == 0
        )
        client = mlflow.MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("sagan-eval").experiment_id])
        scores[where] = run.data.metrics["eval/fid"]
        if where == "s3":
            assert run.data.tags["checkpoint"] == f"{s3}/runs/r1/checkpoint_000001/checkpoint.pt"
    assert scores["s3"] == pytest.approx(scores["disk"], rel=1e-6)
    for flag in ("--stats-file", "--inception-weights"):
        assert evaluate(["--checkpoint", str(ckpt), flag, f"{s3}/stats.pt"]) == 2  # before the checkpoint loads


def test_sample_grids_from_a_checkpoint_on_s3_equal_the_local_ones(s3, digits, eval_cache, tmp_path, capsys):
    ckpt = offline_checkpoint(digits, eval_cache, tmp_path)
    upload(ckpt.parent, f"{s3}/runs/r1/checkpoint_000001")
    assert sample(["--checkpoint", str(ckpt), "--out", str(tmp_path / "disk"), "--per-class", "2", "--images"]) == 0
    capsys.readouterr()
    spec, out = f"{s3}/runs/r1/checkpoint_000001/checkpoint.pt", f"{s3}/samples"
    assert sample(["--checkpoint", spec, "--out", out, "--per-class", "2", "--images"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}/grid.png and 20 image files in {out}/images" in said, said
    stored = objects(out)
    assert "grid.png" in stored and sum(k.startswith("images/") for k in stored) == 20
    assert not any(k.startswith(".") or "/." in k for k in stored)  # no temporary object left
    for key in stored:  # the objects, as files, to compare
        (tmp_path / "s3" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "s3" / key).write_bytes(read_object(f"{out}/{key}"))
    local, remote = images_in(tmp_path / "disk"), images_in(tmp_path / "s3")
    assert local and local.keys() == remote.keys() and all(np.array_equal(local[k], remote[k]) for k in local)
    assert not (tmp_path / "s3:").exists()
    for flag in ("--class-names", "--export-safetensors"):
        assert sample(["--checkpoint", spec, flag, f"{s3}/x.safetensors"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{flag} {s3}/x.safetensors is a URL" in err and len(err.splitlines()) == 1, err
    assert sample(["--checkpoint", spec, "--out", "s3://no-such-bucket/samples"]) == 2
    assert "the bucket no-such-bucket does not exist" in capsys.readouterr().err
    write_object(f"{s3}/runs/r1/checkpoint_000001/checkpoint.pt", b"not a checkpoint")
    capsys.readouterr()
    assert sample(["--checkpoint", f"{s3}/runs/r1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{s3}/runs/r1/checkpoint_000001/checkpoint.pt cannot be read" in err and len(err.splitlines()) == 1, err
