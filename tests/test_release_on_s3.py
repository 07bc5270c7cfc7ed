"""Evaluating and sampling a checkpoint on object storage, with the real images on it too, against a real S3
server on 127.0.0.1 (moto): the same scores and images as from a local copy, messages naming the URL."""

import mlflow
import numpy as np
import pytest

from pipelines.evaluate import main as evaluate
from pipelines.sample import main as sample
from tests.servers import upload, write_object
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


def test_sample_grids_from_a_checkpoint_on_s3_equal_the_local_ones(s3, digits, eval_cache, tmp_path, capsys):
    ckpt = offline_checkpoint(digits, eval_cache, tmp_path)
    upload(ckpt.parent, f"{s3}/runs/r1/checkpoint_000001")
    for where, spec in (("disk", str(ckpt)), ("s3", f"{s3}/runs/r1/checkpoint_000001/checkpoint.pt")):
        assert sample(["--checkpoint", spec, "--out", str(tmp_path / where), "--per-class", "2", "--images"]) == 0
    local, remote = images_in(tmp_path / "disk"), images_in(tmp_path / "s3")
    assert local and local.keys() == remote.keys() and all(np.array_equal(local[k], remote[k]) for k in local)
    write_object(f"{s3}/runs/r1/checkpoint_000001/checkpoint.pt", b"not a checkpoint")
    capsys.readouterr()
    assert sample(["--checkpoint", f"{s3}/runs/r1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{s3}/runs/r1/checkpoint_000001/checkpoint.pt cannot be read" in err and len(err.splitlines()) == 1, err
