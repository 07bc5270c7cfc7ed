"""The whole product on one GPU under Ray, with the bare training step beside it, as one command (issue 22).

    bash benchmarks/gpu_pipeline.sh                                   # on the GPU machine: see that script
    python benchmarks/gpu_pipeline.py --smoke --out /tmp/gp.json      # every stage at toy size, on a CPU

Stages, in this order, each a subprocess with its own time limit (one that fails or hangs loses nothing before
it; the JSON is rewritten after each):
  1. data: photo-like JPEGs in ImageNet's layout (--classes classes; --images train, --val-images val) ->
     preprocessing/shard_imagenet.py --size 128;
  2. train: pipelines/train.py --config configs/imagenet128.yaml on 1 worker = 1 GPU, --batch per step, the
     config's fast path and loader, to --steps with in-loop FID (eval.loop_samples) and a checkpoint there;
     compiles with a cold inductor cache;
  3. bare: benchmarks/train_step.py --preset imagenet128 --variants fast (same model and batch, in memory; its
     compilation finds the inductor cache warm);
  4. resume: the same run.name relaunched to --steps + --resume-steps; its first step must be the checkpoint's + 1;
  5. evaluate: pipelines/evaluate.py on the checkpoint, --eval-samples images (50k: the standard protocol);
  6. sample: pipelines/sample.py grids from it.
FID's Inception network has stand-in random weights (benchmarks/standin_site: the real file cannot be had
offline; same layers, same time): the FIDs are not reported, only times.

Reported (the keys issue 22 names, and more): pipeline_images_per_s (the steady training windows of stage 2,
first window dropped: it holds compilation), bare_images_per_s and their ratio, data_wait_share, the loader's CPU
use (cores busy in the training worker's child processes, and the whole machine's), gpu_memory_peak_gib,
compile_s (cold) and compile_warm_s (the resume), checkpoint_step, resumed_first_step, eval_s, sample_s.
"""

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.preprocess import make_photo

SMOKE = {  # a CPU: every stage and code path, toy sizes
    "classes": 10,
    "images": 160,
    "val_images": 80,
    "size": 32,
    "batch": 8,
    "steps": 6,
    "resume_steps": 2,
    "log_every": 2,
    "loop_samples": 64,
    "eval_samples": 128,
    "model": ["model.resolution=32", "model.ch=8", "model.num_classes=10", "model.g_attn=[16]", "model.d_attn=[16]"],
    "bare": ["--resolution", "32", "--ch", "8", "--num-classes", "10", "--attn", "16", "--batch", "8"],
    "bare_cpu": ["--device", "cpu", "--compile-backend", "aot_eager", "--warmup", "1", "--steps", "2"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--images", type=int, default=5000, help="training JPEGs (default 5,000: 5 per class)")
    p.add_argument("--val-images", type=int, default=2500, help="validation JPEGs, FID's real images")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=256, help="per step (1 worker)")
    p.add_argument("--steps", type=int, default=240, help="stage 2's steps; its checkpoint and in-loop FID are here")
    p.add_argument("--resume-steps", type=int, default=40, help="steps the relaunch trains past the checkpoint")
    p.add_argument("--log-every", type=int, default=20, help="steps per images/s window")
    p.add_argument("--loop-samples", type=int, default=10000, help="in-loop FID's generated images")
    p.add_argument("--eval-samples", type=int, default=50000, help="evaluate.py's generated images")
    p.add_argument("--bare-steps", type=int, default=30, help="timed steps of the bare fast step")
    p.add_argument("--smoke", action="store_true", help="toy sizes on a CPU (overrides the sizes above)")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/gpu_pipeline.json"), help="the JSON")
    p.add_argument("--stage-timeout-s", type=int, default=420, help="the most one stage may take")
    args = p.parse_args(argv)
    if args.smoke:
        for key in ("classes", "images", "val_images", "size", "batch", "steps", "resume_steps", "log_every"):
            setattr(args, key, SMOKE[key])
        args.loop_samples, args.eval_samples, args.bare_steps = SMOKE["loop_samples"], SMOKE["eval_samples"], 2
    return args


def _photo(job) -> None:
    path, seed = job
    rng = np.random.default_rng(seed)
    w, h = (500, 375) if rng.random() < 0.7 else (375, 500)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_photo(rng, w, h).save(path, quality=90)


def make_jpegs(root: Path, classes: int, images: int, val_images: int) -> None:
    """ImageNet's layout: root/{train,val}/nXXXXXXXX/*.JPEG, images dealt round-robin over the classes."""
    jobs = [
        (root / split / f"n{i % classes:08d}" / f"{split}_{i:06d}.JPEG", seed)
        for split, n, offset in (("train", images, 0), ("val", val_images, 10**6))
        for i, seed in zip(range(n), range(offset, offset + n))
    ]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_photo, jobs, chunksize=64))


class CpuSampler:
    """Every second: CPU seconds used so far by the whole machine and by the training worker's child processes
    (the loader; inductor's compile workers left out), each child's last reading kept after it exits."""

    def __init__(self):
        self.rows, self.stop, self.children = [], threading.Event(), {}
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        import psutil  # on the GPU image; not a dependency of this project

        while not self.stop.wait(1.0):
            for proc in psutil.process_iter(["cmdline"]):
                if "RayTrainWorker" not in " ".join(proc.info["cmdline"] or []):
                    continue
                for child in _safe(proc.children, recursive=True) or []:
                    cmdline, times = " ".join(_safe(child.cmdline) or []), _safe(child.cpu_times)
                    if times and "compile_worker" not in cmdline:
                        self.children[child.pid] = times.user + times.system
            total = psutil.cpu_times()
            self.rows.append((time.time(), total.user + total.system, sum(self.children.values())))

    def busy(self, start: float, end: float) -> dict:
        """Mean busy cores between two times (seconds since the epoch)."""
        rows = [r for r in self.rows if start <= r[0] <= end]
        if len(rows) < 2:
            return {}
        (t0, m0, l0), (t1, m1, l1) = rows[0], rows[-1]
        return {
            "machine_cores_busy": round((m1 - m0) / (t1 - t0), 2),
            "loader_cores_busy": round((l1 - l0) / (t1 - t0), 2),
        }


def _safe(fn, **kw):
    import psutil

    try:
        return fn(**kw)
    except psutil.Error:
        return None


def run_stage(result: dict, name: str, cmd: list, args, env=None) -> bool:
    """Run one stage, recording its seconds and outcome; its output goes to WORK/name.log."""
    log = Path(args.work) / f"{name}.log"
    print(f"[{datetime.datetime.now():%H:%M:%S}] {name}: {' '.join(map(str, cmd))}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:  # its own process group: a stage that times out goes with its Ray processes
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=args.stage_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = "timeout"
    seconds = round(time.perf_counter() - start, 1)
    result["stages"][name] = {"seconds": seconds, "exit": code}
    if code != 0:
        result["stages"][name]["log_tail"] = log.read_text(errors="replace").splitlines()[-15:]
        print("\n".join(result["stages"][name]["log_tail"]), flush=True)
    print(f"    {name}: exit {code} in {seconds} s", flush=True)
    write(result, args)
    return code == 0


def write(result: dict, args) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
    env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    for name in ("ray", "mlflow", "webdataset", "torch_fidelity", "pydantic"):
        try:
            env[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            env[name] = None
    return env


def windows(db: str, run_name: str) -> dict:
    """{metric: [(step, value, timestamp s), ...]} of the run's training windows, from MLflow."""
    import mlflow

    client = mlflow.MlflowClient(db)
    exp = client.get_experiment_by_name("sagan-train")
    (run,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'")
    names = ("images_per_s", "step_time_s", "data_wait_share", "gpu_memory_peak_gib")
    return {
        n: sorted((m.step, m.value, m.timestamp / 1000) for m in client.get_metric_history(run.info.run_id, n))
        for n in names
    }


def summarize_training(hist: dict, first: int, last: int, batch: int) -> dict:
    """Steady state over the windows of steps (first, last] but the first one, which holds compilation; images/s
    of `batch` images per step (1 worker, n_dis 1)."""
    pick = {n: [v for s, v, _ in rows if first < s <= last] for n, rows in hist.items()}
    if len(pick["images_per_s"]) < 2:
        return {}
    first_steps = min(s for s, _, _ in hist["step_time_s"] if first < s <= last) - first  # its window's length
    steady_step = float(np.mean(pick["step_time_s"][1:]))
    out = {
        "images_per_s": round(batch / steady_step, 1),
        "data_wait_share": round(float(np.mean(pick["data_wait_share"][1:])), 4),
        "step_s": round(steady_step, 4),
        # the first window's time over as many steady steps: compilation, cuDNN autotuning, the loader's start
        "compile_s": round((pick["step_time_s"][0] - steady_step) * first_steps, 1),
        "windows": len(pick["images_per_s"]) - 1,
    }
    if pick["gpu_memory_peak_gib"]:
        out["gpu_memory_peak_gib"] = round(max(pick["gpu_memory_peak_gib"]), 2)
    return out


def logged_steps(folder: Path) -> list[int]:
    return sorted({json.loads(line)["step"] for f in folder.glob("*.jsonl") for line in f.read_text().splitlines()})


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.work and Path(args.work).exists() and any(Path(args.work).iterdir()):
        sys.exit(f"error: --work {args.work} is not empty (a run there would resume, not start); name a new folder")
    with tempfile.TemporaryDirectory() as tmp:
        args.work = args.work or tmp
        return pipeline(args, Path(args.work))


def pipeline(args, work: Path) -> dict:
    import torch

    from benchmarks.eval_speed import stand_in_inception_weights
    from sagan.files import sha256_file

    py, work = sys.executable, work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "gpu_pipeline",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "sizes": {k: getattr(args, k) for k in ("classes", "images", "val_images", "size", "batch", "steps")},
        "inception_weights": "stand-in (random): times only, no FID reported",
        "stages": {},
    }
    weights = stand_in_inception_weights(work)
    env = dict(os.environ, SAGAN_STANDIN_INCEPTION_SHA256=sha256_file(weights), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "benchmarks/standin_site"), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    make_jpegs(work / "raw", args.classes, args.images, args.val_images)
    result["stages"]["jpegs"] = {"seconds": round(time.perf_counter() - start, 1)}
    shards = work / "shards"
    shard = [py, REPO / "preprocessing/shard_imagenet.py", "--src", work / "raw", "--out", shards]
    if not run_stage(result, "shard", shard + ["--size", str(args.size), "--shard-size", "1000"], args, env):
        return result
    db, name = f"sqlite:///{work / 'mlflow.db'}", "gpu-pipeline"
    train = [py, REPO / "pipelines/train.py", "--config", REPO / "configs/imagenet128.yaml"]
    train += [
        f"data.train_shards={shards / 'train'}",
        f"data.val_shards={shards / 'val'}",
        f"eval.cache_dir={work / 'cache'}",
        f"eval.inception_weights={weights}",
        f"eval.loop_samples={args.loop_samples}",
        f"mlflow.tracking_uri={db}",
        f"run.name={name}",
        f"run.storage_path={work / 'runs'}",
        "scaling.num_workers=1",
        f"train.batch_size={args.batch}",
        f"train.log_every={args.log_every}",
        f"train.ckpt_every={args.steps}",
        f"train.eval_every={args.steps}",
        f"train.sample_every={args.steps}",
    ]
    if args.smoke:
        train += [*SMOKE["model"], "scaling.use_gpu=false", "scaling.cpus_per_worker=1"]
    sampler = CpuSampler()
    sampler.thread.start()
    trained = run_stage(result, "train", train + [f"train.steps={args.steps}"], args, env)
    sampler.stop.set()
    if trained:
        hist = windows(db, name)
        steady = summarize_training(hist, 0, args.steps, args.batch)
        times = [t for s, _, t in hist["images_per_s"] if s <= args.steps]
        steady.update(sampler.busy(times[0], times[-1]) if len(times) > 1 else {})
        result["train"] = steady
        result["pipeline_images_per_s"] = steady.get("images_per_s")
        result["data_wait_share"] = steady.get("data_wait_share")
        ckpts = sorted((work / "runs" / name).glob("checkpoint_*/checkpoint.pt"))
        if ckpts:
            result["checkpoint_step"] = torch.load(ckpts[-1], map_location="cpu", weights_only=True)["step"]
    bare = [py, REPO / "benchmarks/train_step.py", "--preset", "imagenet128", "--variants", "fast"]
    bare += ["--steps", str(args.bare_steps), "--out", work / "bare.json"]
    bare += SMOKE["bare"] + SMOKE["bare_cpu"] if args.smoke else []
    if run_stage(result, "bare", bare, args, env):
        fast = json.loads((work / "bare.json").read_text())["variants"]["fast"]
        result["bare"] = {k: fast.get(k) for k in ("images_per_s", "step_s", "mfu", "peak_memory_gib", "warmup_s")}
        result["bare_images_per_s"] = fast.get("images_per_s")
        if result.get("pipeline_images_per_s") and fast.get("images_per_s"):
            result["pipeline_over_bare"] = round(result["pipeline_images_per_s"] / fast["images_per_s"], 3)
    write(result, args)
    if not trained:
        return result
    env_resume = dict(env, SAGAN_BATCH_LOG=str(work / "resume-batches"))
    end = args.steps + args.resume_steps
    if run_stage(result, "resume", train + [f"train.steps={end}"], args, env_resume):
        steps = logged_steps(work / "resume-batches")
        result["resumed_first_step"] = steps[0] if steps else None
        resumed = summarize_training(windows(db, name), args.steps, end, args.batch)
        result["resume"] = {"compile_warm_s": resumed.get("compile_s"), "images_per_s": resumed.get("images_per_s")}
    evaluate = [py, REPO / "pipelines/evaluate.py", "--checkpoint", work / "runs" / name]
    evaluate += [f"eval.num_samples={args.eval_samples}", f"mlflow.tracking_uri={db}"]
    if run_stage(result, "evaluate", evaluate, args, env):
        result["eval_s"] = result["stages"]["evaluate"]["seconds"]
        result["eval_samples"] = args.eval_samples
    sample = [py, REPO / "pipelines/sample.py", "--checkpoint", work / "runs" / name, "--out", work / "samples"]
    sample += ["--classes", "0,1,2,3", "--per-class", "8", "--tracking-uri", db]
    if run_stage(result, "sample", sample, args, env):
        result["sample_s"] = result["stages"]["sample"]["seconds"]
        result["sample_files"] = sorted(p.name for p in (work / "samples").iterdir())
    write(result, args)
    print(json.dumps({k: v for k, v in result.items() if k not in ("stages",)}, indent=1))
    return result


if __name__ == "__main__":
    main()
