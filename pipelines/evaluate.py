"""Score a SAGAN checkpoint with FID and IS (torch-fidelity) and log them into its training run in MLflow.

    python pipelines/evaluate.py --checkpoint runs/sagan-demo             # the run's latest checkpoint
    python pipelines/evaluate.py --checkpoint runs/sagan-demo/best        # its best by in-loop FID
    python pipelines/evaluate.py --checkpoint runs/sagan-demo/checkpoint_.../checkpoint.pt eval.num_samples=10000
    ray job submit --working-dir . --entrypoint-num-gpus 1 -- \\
        python pipelines/evaluate.py --checkpoint /mnt/shared/sagan-runs/sagan-imagenet128

Generates eval.num_samples images (default 50,000, classes balanced) with the EMA generator (--raw: the
trained G), on a GPU when there is one, and feeds them to torch-fidelity in batches; no image is written.
FID is against the real images of data.val_shards (eval.real_split=train: data.train_shards), whose
statistics are computed once and cached by content (or read from / written to --stats-file). IS uses 10
splits. eval.feature_extractor: inception-v3-compat (standard; weights downloaded once, or
--inception-weights for offline clusters) or sample-classifier (the built-in digits; adds class accuracy).

--register NAME also logs the generator into that run as an MLflow model (pipelines/release/generator_model.py:
class ids, seeds and truncation in, images out) and registers it as a new version of NAME.

Results land in the MLflow run that wrote the checkpoint, at the checkpoint's step (or in --run-id); with
no known run, in a new run of --experiment tagged with the checkpoint. key=value overrides apply to the
checkpoint's eval.* and data.* keys and mlflow.tracking_uri (the model is the checkpoint's).
"""

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from pipelines.common.cli import local_file, pick_device
from pipelines.common.config import from_dict
from pipelines.common.provenance import git_commit
from pipelines.common.run_folder import absolute, load_checkpoint_at
from pipelines.release.registry import check_name, register_generator
from pipelines.release.sources import shard_class_names
from pipelines.tracking.evaluations import evaluation_target, log_evaluation
from sagan.checkpoint import generator_from_state
from sagan.config import with_overrides
from sagan.errors import JobFailed, UsageError, command, first_line
from sagan.metrics import build_evaluator, feature_weights, verified_real_shards
from sagan.real_stats import check_stats_file
from sagan.viz import grid_inputs, sample_grid

OVERRIDABLE = ("eval.", "data.", "mlflow.tracking_uri=")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint.pt, a checkpoint_* directory, or a run directory (its latest checkpoint)",
    )
    p.add_argument("--raw", action="store_true", help="score the trained G instead of its EMA")
    p.add_argument("--run-id", help="MLflow run to log into (default: the run recorded in the checkpoint)")
    p.add_argument(
        "--experiment",
        default="sagan-eval",
        help="experiment of the new run made when no run is known (default sagan-eval)",
    )
    p.add_argument("--stats-file", help="real statistics file: read if it exists, else computed and written there")
    p.add_argument("--inception-weights", help="local Inception weights file (same as eval.inception_weights)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available; default)")
    p.add_argument(
        "--register",
        metavar="NAME",
        help="also log the generator as an MLflow model in the run and register it as a new version of NAME",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides of eval.*, data.* and mlflow.tracking_uri, e.g. eval.num_samples=10000",
    )
    return p.parse_args(argv)


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    local_file(args.stats_file, "--stats-file", "share statistics between machines with eval.cache_dir=s3://...")
    local_file(args.inception_weights, "--inception-weights", "download the file and give its path")
    state, ckpt = load_checkpoint_at(args.checkpoint)  # a path or an object-storage URL
    bad = [o for o in args.overrides if not o.startswith(OVERRIDABLE)]
    if bad:
        raise UsageError(
            f"override {bad[0]} is not allowed here: only eval.*, data.* and mlflow.tracking_uri "
            "(the model is the checkpoint's)"
        )
    cfg = with_overrides(from_dict(state["config"]), args.overrides)
    if args.register is not None:  # --register "" too: a name MLflow would refuse after the whole evaluation
        check_name(args.register)
        if args.raw:
            raise UsageError("--register registers the EMA generator, which --raw leaves out: drop one of them")
    if args.inception_weights:
        cfg.eval.inception_weights = absolute(args.inception_weights)
    check_stats_file(args.stats_file)
    step, extra = int(state["step"]), state["extra"]
    device = pick_device(args.device)
    # The checks first: the weights fit the saved config (seconds), the data (its bytes: data.verify), the
    # extractor's weights, MLflow; then the real statistics and the extractor, before a single sample.
    G, _ = generator_from_state(state, ema=not args.raw, device=device)
    del state
    verified_real_shards(cfg)
    weights = feature_weights(cfg)
    uri, run_id = evaluation_target(cfg, extra, args.run_id)
    evaluator = build_evaluator(cfg, device, stats_file=args.stats_file, weights=weights)
    print(
        f"scoring {'raw G' if args.raw else 'G_ema'} of {ckpt} (step {step}): {cfg.eval.num_samples} samples "
        f"on {device}, {cfg.eval.feature_extractor}",
        flush=True,
    )
    scores = evaluator(G, cfg.eval.num_samples, progress=True)
    line = f"FID {scores['fid']:.3f}  IS {scores['is']:.3f} ± {scores['is_std']:.3f}"
    if "class_acc" in scores:
        line += f"  class accuracy {scores['class_acc']:.1%}"
    print(f"{line}  ({cfg.eval.num_samples} samples, step {step})")
    print(json.dumps({"step": step, **scores}), flush=True)  # before MLflow: a logging failure keeps the scores
    z, y = grid_inputs(cfg.model.z_dim, cfg.model.num_classes, cfg.eval.seed)
    with torch.no_grad():
        grid = sample_grid(G(z.to(device), y.to(device)))
    try:
        run_id = log_evaluation(uri, run_id, cfg, ckpt, step, scores, grid, args.raw, args.experiment)
    except Exception as e:  # noqa: BLE001 - the scores are printed above; say what failed in one line
        raise JobFailed(f"the scores could not be logged to MLflow at {uri}: {first_line(e)}") from None
    print(f"logged to MLflow run {run_id} at {uri}")
    return register(args, uri, run_id, G, cfg, ckpt, step, scores) if args.register is not None else 0


def register(args, uri: str, run_id: str, G, cfg, ckpt: str, step: int, scores: dict) -> int:
    """Log G as an MLflow model in `run_id`, with the scores just measured, and register it under --register."""
    names = shard_class_names(cfg.data.train_shards, cfg.model.num_classes)
    meta = {
        "step": step,
        "weights": "ema",
        "checkpoint": str(ckpt),
        "git_commit": git_commit() or "unknown",
        **scores,
        **({"class_names": names} if names else {}),
    }
    try:
        version = register_generator(uri, run_id, args.register, G, cfg, meta)
    except Exception as e:  # noqa: BLE001 - the scores are logged; say what failed in one line
        raise JobFailed(f"the generator could not be registered as {args.register} at {uri}: {first_line(e)}") from None
    print(
        f"registered models:/{args.register}/{version} (run {run_id}); sample it with "
        f"python pipelines/sample.py --checkpoint models:/{args.register}/{version}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
