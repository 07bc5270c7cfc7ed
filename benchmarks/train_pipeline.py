"""Training images/s through the whole Ray pipeline against the bare training step, in one run.

    python benchmarks/train_pipeline.py [--steps 60] [--ch 8] [--batch 16]

Pipeline: pipelines/train.py's TorchTrainer on a local Ray (WebDataset streaming from the sample shards,
DDP, MLflow logging, checkpoints), read back as the steady-state images/s it logs (first window dropped).
Bare: sagan.step.Trainer.train_step on in-memory batches in this process, one thread per worker as Ray
gives. Printed as one JSON line with the ratios pipeline / bare for 1 and 2 workers.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.train_step import main as bare_step


def pipeline_images_per_s(tmp: Path, shards: Path, workers: int, args) -> float:
    db = f"sqlite:///{tmp / 'mlflow.db'}"
    name = f"bench-{workers}w"
    cmd = [
        sys.executable,
        str(REPO / "pipelines/train.py"),
        f"data.train_shards={shards}",
        f"run.name={name}",
        f"run.storage_path={tmp / 'runs'}",
        f"mlflow.tracking_uri={db}",
        f"model.ch={args.ch}",
        f"train.batch_size={args.batch}",
        f"train.steps={args.steps}",
        "train.log_every=10",
        f"train.sample_every={args.steps}",
        f"train.ckpt_every={args.steps}",
        "train.eval_every=0",
        f"scaling.num_workers={workers}",
        f"scaling.cpus_per_worker={1.0 if workers == 1 else 0.5}",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    client = mlflow.MlflowClient(db)
    exp = client.get_experiment_by_name("sagan-train")
    (run,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    history = sorted(client.get_metric_history(run.info.run_id, "images_per_s"), key=lambda m: m.step)
    steady = [m.value for m in history[1:]]  # the first window holds start-up
    return sum(steady) / len(steady)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--ch", type=int, default=8)
    p.add_argument("--batch", type=int, default=16, help="per worker")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        py = sys.executable
        subprocess.run(
            [py, str(REPO / "preprocessing/make_sample_data.py"), "--out", str(tmp / "raw")],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                py,
                str(REPO / "preprocessing/shard_imagenet.py"),
                "--src",
                str(tmp / "raw"),
                "--out",
                str(tmp / "shards"),
                "--size",
                "32",
                "--shard-size",
                "200",
            ],
            check=True,
            capture_output=True,
        )
        common = ["--resolution", "32", "--ch", str(args.ch), "--steps", "20", "--device", "cpu"]
        bare_1 = bare_step([*common, "--batch", str(args.batch), "--threads", "1"])["images_per_s"]
        bare_2 = bare_step([*common, "--batch", str(2 * args.batch), "--threads", "2"])["images_per_s"]
        pipe_1 = pipeline_images_per_s(tmp, tmp / "shards/train", 1, args)
        pipe_2 = pipeline_images_per_s(tmp, tmp / "shards/train", 2, args)
    result = {
        "benchmark": "train_pipeline",
        "ch": args.ch,
        "batch_per_worker": args.batch,
        "torch": torch.__version__,
        "bare_1_thread_images_per_s": bare_1,
        "pipeline_1_worker_images_per_s": round(pipe_1, 1),
        "ratio_1_worker": round(pipe_1 / bare_1, 2),
        "bare_2_threads_global_batch_images_per_s": bare_2,
        "pipeline_2_workers_images_per_s": round(pipe_2, 1),
        "ratio_2_workers": round(pipe_2 / bare_2, 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
