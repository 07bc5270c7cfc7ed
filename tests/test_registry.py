"""The generator as a registered MLflow model: evaluate.py --register, sampling models:/NAME/VERSION, and the
model loaded with neither Ray nor this repository."""

import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.evaluate import main as evaluate_main
from pipelines.release.registry import register_generator
from pipelines.sample import main
from sagan.checkpoint import load_generator
from tests.test_evaluate import offline_checkpoint
from tests.test_sample import images_in


def test_registered_model_gives_the_checkpoints_images(digits, eval_cache, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("sagan-train", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.set_terminated(run_id, "KILLED")
    ckpt = offline_checkpoint(digits, eval_cache, tmp_path, extra={"mlflow_run_id": run_id})
    for bad, message in (("a/b", "is not a usable model name"), ("sagan-digits --raw", "drop one of them")):
        name, *flags = bad.split()
        assert evaluate_main(["--checkpoint", str(ckpt), "--register", name, *flags, f"mlflow.tracking_uri={uri}"]) == 2
        assert message in capsys.readouterr().err  # before the evaluation, not after it
    assert (
        evaluate_main(
            [
                "--checkpoint",
                str(ckpt),
                "--register",
                "sagan-digits",
                "eval.num_samples=60",
                f"mlflow.tracking_uri={uri}",
            ]
        )
        == 0
    )
    assert "registered models:/sagan-digits/1" in capsys.readouterr().out
    version = client.get_model_version("sagan-digits", "1")
    assert version.run_id == run_id and version.tags["step"] == "0" and float(version.tags["fid"]) > 0
    assert client.get_run(run_id).info.status == "KILLED"  # registering leaves the run's status as it was

    for name, spec in (("ckpt", str(ckpt)), ("model", "models:/sagan-digits/1")):
        assert (
            main(
                [
                    "--checkpoint",
                    spec,
                    "--tracking-uri",
                    uri,
                    "--out",
                    str(tmp_path / name),
                    "--classes",
                    "3,9",
                    "--per-class",
                    "2",
                    "--truncation",
                    "1.0",
                    "--images",
                ]
            )
            == 0
        )
    a, b = images_in(tmp_path / "ckpt" / "images"), images_in(tmp_path / "model" / "images")
    assert len(a) == 4 and list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)

    assert main(["--checkpoint", "models:/sagan-digits/2", "--tracking-uri", uri, "--out", str(tmp_path / "v2")]) == 2
    assert "error: cannot load models:/sagan-digits/2 from MLflow" in capsys.readouterr().err

    # A second registration from the same run (another checkpoint of it, say) leaves version 1 as it was.
    G, cfg = load_generator(ckpt)
    with torch.no_grad():
        G.out_conv.bias.add_(0.5)  # (a sign flip of a spectrally normalised weight would cancel out)
    assert register_generator(uri, run_id, "sagan-digits", G, cfg, {"step": 7}) == "2"
    for version in ("1", "2"):
        assert (
            main(
                [
                    "--checkpoint",
                    f"models:/sagan-digits/{version}",
                    "--tracking-uri",
                    uri,
                    "--out",
                    str(tmp_path / f"v{version}"),
                    "--classes",
                    "3,9",
                    "--per-class",
                    "2",
                    "--truncation",
                    "1.0",
                    "--images",
                ]
            )
            == 0
        )
    v1, v2 = images_in(tmp_path / "v1" / "images"), images_in(tmp_path / "v2" / "images")
    assert all(np.array_equal(v1[k], a[k]) for k in a) and not any(np.array_equal(v2[k], a[k]) for k in a)

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/sagan-digits/1")
    rows = pd.DataFrame({"class_id": [3, 9], "seed": [0, 1], "truncation": [1.0, 1.0]})
    np.testing.assert_array_equal(model.predict(rows), np.stack([a["0003_000000"], a["0009_000001"]]))
    with pytest.raises(Exception, match="class_id must be in 0..9"):
        model.predict(pd.DataFrame({"class_id": [10], "seed": [0]}))

    # Loading needs neither Ray nor this repository's pipelines: the model brings its own copy of sagan.
    script = f"""
import sys
sys.modules["ray"] = sys.modules["pipelines"] = None  # any import of them fails
import mlflow, pandas as pd
mlflow.set_tracking_uri({uri!r})
model = mlflow.pyfunc.load_model("models:/sagan-digits/1")
print(model.predict(pd.DataFrame({{"class_id": [3], "seed": [0], "truncation": [1.0]}})).sum())
print(sys.modules["sagan"].__file__)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    total, sagan_file = done.stdout.split()[-2:]
    assert int(total) == int(a["0003_000000"].sum()) and "/code/sagan/" in sagan_file and "/work/" not in sagan_file
