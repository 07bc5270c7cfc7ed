"""What losing a node costs an elastic run, on a local 2-node cluster (cluster/local.py), as JSON.

    python benchmarks/node_loss.py --repeats 2 --out benchmarks/results/node_loss.json

Per repeat, an elastic run (scaling.num_workers=[1,2], one worker per node, the sample digits, data and
checkpoints on a folder both nodes see) is submitted as a Ray job. Once two workers have saved a checkpoint,
the worker node is killed (`cluster/local.py stop-node`: every process of it, as a lost machine), and started
again once the run has gone on with one worker to a checkpoint (checkpoints as Ray Train records them). Measured
from the run's SAGAN_BATCH_LOG:
  lost_s    from the kill to the first step of one worker (placement attempts, group restart, resume);
  regrow_s  from `start-node` to the first step of two workers (node start, scaling.resize_check_s, restart);
  redone    steps trained before the kill and again after it (those since the last checkpoint).
Each run must end at its last step with exit 0. On a 2-core machine the figures include its contention.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from cluster.local import free_port, ray_env
from pipelines.common.run_folder import RunFolder
from pipelines.training.batch_log import entries, first_step_time, worlds_after

LOCAL = [sys.executable, str(REPO / "cluster" / "local.py")]


def wait_until(ready, job: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not ready():
        if job.poll() is not None:
            sys.exit(f"error: the job ended (exit {job.returncode}) while waiting for {what} (its output: --logs)")
        if time.time() > deadline:
            sys.exit(f"error: no {what} within {timeout:.0f} s")
        time.sleep(0.5)


def one_loss(folder: Path, state: dict, shards: Path, name: str, args) -> dict:
    log, runs = folder / f"batches-{name}", folder / "runs"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", str(REPO)]
    cmd += ["--runtime-env-json", json.dumps({"env_vars": {"SAGAN_BATCH_LOG": str(log)}}), "--"]
    cmd += ["python", "pipelines/train.py", f"data.train_shards={shards}", f"run.storage_path={runs}"]
    cmd += [f"run.name={name}", f"mlflow.tracking_uri={state['mlflow']}", "scaling.num_workers=[1,2]"]
    cmd += [f"scaling.resize_check_s={args.resize_check_s}", "scaling.cpus_per_worker=1", "model.ch=8"]
    cmd += ["train.batch_size=4", f"train.steps={args.steps}", "train.log_every=10", "train.ckpt_every=10"]
    cmd += ["train.sample_every=1000", "train.eval_every=0", "run.max_failures=3"]
    env = {**ray_env(folder), "RAY_ADDRESS": state["address"]}
    run = RunFolder(str(runs), name)
    began = time.time()
    output = open(folder / f"job-{name}.log", "w+")  # a file, not a pipe: nothing read until the end can block it
    job = subprocess.Popen(cmd, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
    try:
        # A checkpoint of each group before the kill and before the restart, as Ray Train records it (a checkpoint
        # is on storage before Ray Train takes the worker's report, at its next poll): the run may start on one
        # worker, and a group lost before Ray Train has its checkpoint restarts from the one before.
        wait_until(lambda: run.resume_world() == 2, job, 300, "a checkpoint of two workers")
        killed_at = time.time()
        subprocess.run([*LOCAL, "stop-node", "--dir", str(folder), "--node", "1"], check=True, capture_output=True)
        wait_until(lambda: 1 in worlds_after(log, killed_at), job, 300, "a step on one worker after the kill")
        wait_until(lambda: run.resume_world() == 1, job, 300, "a checkpoint of one worker")
        back_at = time.time()
        subprocess.run([*LOCAL, "start-node", "--dir", str(folder), "--node", "1"], check=True, capture_output=True)
        wait_until(lambda: 2 in worlds_after(log, back_at), job, 300, "two workers after the restart")
        job.wait(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
        output.seek(0)
        out = output.read()
        output.close()
        if args.logs:
            Path(args.logs).mkdir(parents=True, exist_ok=True)
            (Path(args.logs) / f"job-{name}.log").write_text(out)
    lines = entries(log)
    resumed_at = first_step_time(log, killed_at, 1)  # the lost group trained on until its node was gone
    before = max(e["step"] for e in lines if e["time"] < resumed_at and e["world"] == 2)
    resumed = min(e["step"] for e in lines if e["time"] >= killed_at and e["world"] == 1)
    return {
        "run": name,
        "exit": job.returncode,
        "last_step": max(e["step"] for e in lines),
        "lost_s": round(resumed_at - killed_at, 1),
        "regrow_s": round(first_step_time(log, back_at, 2) - back_at, 1),
        "redone_steps": before - (resumed - 1),
        "wall_s": round(time.time() - began, 1),
        "resize_lines": sorted(
            {line.split("resize at", 1)[1][:160] for line in out.splitlines() if "resize at" in line}
        ),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="runs, one node loss each (default 2)")
    p.add_argument("--steps", type=int, default=400, help="steps per run: enough to outlast a loss and a regrowth")
    p.add_argument("--resize-check-s", type=float, default=5.0, help="scaling.resize_check_s of the runs")
    p.add_argument("--out", default=None, help="write the result here as JSON")
    p.add_argument("--logs", default=None, help="keep each job's output in this folder")
    args = p.parse_args(argv)
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        subprocess.run([py, REPO / "preprocessing/make_sample_data.py", "--out", folder / "raw"], check=True)
        shard = [py, REPO / "preprocessing/shard_imagenet.py", "--src", folder / "raw", "--out", folder / "shards"]
        subprocess.run([*shard, "--size", "32", "--shard-size", "200"], check=True, capture_output=True)
        up = [*LOCAL, "up", "--dir", str(folder), "--workers", "1", "--cpus", "1", "--mlflow-port", str(free_port())]
        subprocess.run(up, check=True, capture_output=True, timeout=240)
        try:
            state = json.loads((folder / "cluster.json").read_text())
            losses = [one_loss(folder, state, folder / "shards/train", f"loss-{i}", args) for i in range(args.repeats)]
        finally:
            subprocess.run([*LOCAL, "down", "--dir", str(folder)], capture_output=True, timeout=120)
    import ray

    result = {
        "benchmark": "node_loss",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": {"python": platform.python_version(), "ray": ray.__version__, "cpus": os.cpu_count()},
        "setting": {"num_workers": [1, 2], "steps": args.steps, "resize_check_s": args.resize_check_s},
        "losses": losses,
        "lost_s_median": round(statistics.median(x["lost_s"] for x in losses), 1),
        "regrow_s_median": round(statistics.median(x["regrow_s"] for x in losses), 1),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
    for x in losses:
        print(json.dumps({k: v for k, v in x.items() if k != "resize_lines"}))
    if any(x["exit"] != 0 or x["last_step"] != args.steps for x in losses):
        sys.exit("error: a run did not end at its last step with exit 0 (see losses in the JSON)")
    return result


if __name__ == "__main__":
    main()
