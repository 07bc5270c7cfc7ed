"""Quality proof on the built-in sample set: the demo's generator at step 0 against the end of `make demo`.

    make demo && .venv/bin/python benchmarks/demo_quality.py [--checkpoint runs/sagan-demo]

Step 0 is the generator the demo run starts from (its config and seed rebuild it exactly); the end is the
EMA generator of the run's last checkpoint. Both are scored the way pipelines/evaluate.py scores them
(eval.num_samples from the run's config, the sample classifier's features, cached real statistics). The
in-loop FID curve is read from the run's MLflow history (the training loop also logs it as
plots/loop_fid.png). Prints one JSON line; exits 1 when the demo misses the bar: FID cut at least 10-fold
from step 0 and class accuracy of at least 95%.
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from pipelines.common.config import from_dict
from pipelines.common.run_folder import find_checkpoint
from pipelines.tracking.store import default_tracking_uri
from sagan.checkpoint import load_checkpoint, load_generator
from sagan.config import SAMPLE_CLASSIFIER
from sagan.errors import UsageError
from sagan.metrics import build_evaluator
from sagan.models import build_models

MIN_FID_CUT = 10.0  # the evaluation issue's bar
MIN_CLASS_ACC = 0.95


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint", default=str(REPO / "runs" / "sagan-demo"), help="the demo run (default runs/sagan-demo)"
    )
    args = p.parse_args(argv)
    try:
        ckpt = find_checkpoint(args.checkpoint)
    except UsageError as e:
        print(f"error: {e}; run `make demo` first", file=sys.stderr)
        return 2
    state = load_checkpoint(ckpt)
    cfg, step, extra = from_dict(state["config"]), int(state["step"]), state["extra"]
    if cfg.eval.feature_extractor != SAMPLE_CLASSIFIER or not extra.get("mlflow_run_id"):
        print(
            f"error: {ckpt} is not a demo run on the sample set with an MLflow run; run `make demo` first",
            file=sys.stderr,
        )
        return 2
    evaluator = build_evaluator(cfg, "cpu")
    G0, _ = build_models(cfg.model, seed=cfg.train.seed)  # the run's step 0, as the training loop builds it
    start = evaluator(G0, cfg.eval.num_samples)
    end = evaluator(load_generator(ckpt)[0], cfg.eval.num_samples)

    import mlflow

    client = mlflow.MlflowClient(extra.get("mlflow_tracking_uri") or default_tracking_uri())
    history = sorted(client.get_metric_history(extra["mlflow_run_id"], "loop/fid"), key=lambda m: m.timestamp)
    curve = sorted({m.step: round(m.value, 3) for m in history}.items())  # a resumed run's replayed steps: the latest
    result = {
        "benchmark": "demo_quality",
        "checkpoint": str(ckpt),
        "num_samples": cfg.eval.num_samples,
        "step_0": {k: round(v, 4) for k, v in start.items()},
        f"step_{step}": {k: round(v, 4) for k, v in end.items()},
        "fid_cut": round(start["fid"] / end["fid"], 1),
        "in_loop_fid_curve": curve,
        "curve_plot": f"MLflow run {extra['mlflow_run_id']}: plots/loop_fid.png",
    }
    result["passes"] = result["fid_cut"] >= MIN_FID_CUT and end["class_acc"] >= MIN_CLASS_ACC
    print(json.dumps(result))
    return 0 if result["passes"] else 1


if __name__ == "__main__":
    sys.exit(main())
