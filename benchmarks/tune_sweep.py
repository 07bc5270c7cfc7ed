"""Where a sweep's time goes: runs a sweep (by default the demo, configs/tune_demo.yaml) and splits its wall
time from the trials' MLflow child runs into training, in-loop evaluation and fixed cost.

    python benchmarks/tune_sweep.py                                   # the demo sweep, ~10 minutes on 2 cores
    python benchmarks/tune_sweep.py --config configs/tune_demo.yaml tune.name=bench-2 tune.steps=200

Per trial: fixed cost = from the child run's start (the trial driver starting) to its first training step,
i.e. the first logged step's time minus the steps before it at the measured step time; it includes Ray
Train's worker start, building the models and the step-0 in-loop FID. Training = the steps x the step time
logged at each log step (which excludes evaluation). The rest of the sweep's wall time is Ray and Tune's
own start, in-loop evaluation, checkpoints and reporting. Prints one JSON line and writes --out.
"""

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.common.config import load_config
from pipelines.sweep.trials import ROLE_TAG, SWEEP_TAG
from pipelines.tracking.store import default_tracking_uri
from pipelines.tune import DEMO_CONFIG
from pipelines.tune import main as tune_main


def trial_times(client, run, log_every: int) -> dict:
    """Fixed cost, training and evaluation seconds of one trial's child run."""
    step_times = {m.step: m for m in client.get_metric_history(run.info.run_id, "step_time_s")}
    fids = {m.step: m.timestamp for m in client.get_metric_history(run.info.run_id, "loop/fid")}
    if not step_times:
        return {"trial": run.data.tags.get("sagan.trial_id"), "steps": 0}
    first = min(step_times)
    first_m = step_times[first]
    start_s = run.info.start_time / 1000
    training = sum(m.value * min(log_every, s) for s, m in step_times.items())
    fixed = first_m.timestamp / 1000 - start_s - first * first_m.value
    end_s = (run.info.end_time or max(m.timestamp for m in step_times.values())) / 1000
    return {
        "trial": run.data.tags.get("sagan.trial_id"),
        "steps": max(step_times),
        "wall_s": round(end_s - start_s, 1),
        "start_to_first_step_s": round(fixed, 1),
        "training_s": round(training, 1),
        "evaluations": len(fids),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEMO_CONFIG))
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    start = time.perf_counter()
    code = tune_main(["--config", args.config, *args.overrides])
    wall = time.perf_counter() - start
    if code != 0:
        sys.exit(f"error: the sweep exited with {code}")
    import mlflow

    uri = default_tracking_uri(cfg.mlflow.tracking_uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tune.experiment)
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`{SWEEP_TAG}` = '{cfg.tune.name}' and tags.`{ROLE_TAG}` = 'trial'"
    )
    trials = [trial_times(client, r, cfg.train.log_every) for r in runs]
    training = sum(t.get("training_s", 0) for t in trials)
    fixed = [t["start_to_first_step_s"] for t in trials if "start_to_first_step_s" in t]
    result = {
        "benchmark": "tune_sweep",
        "sweep": cfg.tune.name,
        "trials": len(trials),
        "sweep_wall_s": round(wall, 1),
        "training_s": round(training, 1),
        "training_share": round(training / wall, 3),
        "trial_start_to_first_step_s": {"min": min(fixed), "max": max(fixed), "mean": round(sum(fixed) / len(fixed), 1)}
        if fixed
        else None,
        "per_trial": trials,
    }
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
