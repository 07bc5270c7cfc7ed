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

--register NAME also logs the generator into that run as an MLflow model (pipelines/generator_model.py:
class ids, seeds and truncation in, images out) and registers it as a new version of NAME.

Results land in the MLflow run that wrote the checkpoint, at the checkpoint's step (or in --run-id); with
no known run, in a new run of --experiment tagged with the checkpoint. key=value overrides apply to the
checkpoint's eval.* and data.* keys and mlflow.tracking_uri (the model is the checkpoint's).
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from pipelines.common.cli import pick_device
from pipelines.common.provenance import git_commit, ray_job_id
from pipelines.common.run_folder import absolute, find_checkpoint
from pipelines.tracking.store import check_tracking, default_tracking_uri, prepare_tracking
from sagan.checkpoint import generator_from_state, load_checkpoint
from sagan.config import from_dict, with_overrides
from sagan.errors import JobFailed, UsageError, command, first_line

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


def mlflow_target(args, cfg, extra: dict) -> tuple[str, str | None]:
    """(tracking URI, run id to log into or None): the training run's unless told otherwise; checked now,
    so an unreachable store or a missing run stops the job before any sample is generated."""
    import mlflow

    uri = cfg.mlflow.tracking_uri or extra.get("mlflow_tracking_uri") or default_tracking_uri()
    run_id = args.run_id or extra.get("mlflow_run_id")
    fix = "pass mlflow.tracking_uri=URI of the training store, or --run-id"
    if run_id and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UsageError(f"MLflow run {run_id} is not in {uri}: that store does not exist; {fix}")
    check_tracking(uri)  # seconds; MLflow's client would retry an unreachable server for minutes
    client = mlflow.MlflowClient(uri)
    try:
        if run_id:
            client.get_run(run_id)
        else:
            client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - a missing run and an unreachable store have the same fix
        where = f"MLflow run {run_id} is not in {uri}" if run_id else f"MLflow store {uri} is not usable"
        raise UsageError(f"{where} ({first_line(e)}); {fix}") from None
    return uri, run_id


def log_results(uri: str, run_id: str | None, args, cfg, ckpt: Path, step: int, scores: dict, grid) -> str:
    """Metrics at `step`, settings as params, a sample grid and a JSON record into the run; returns its id."""
    import mlflow
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(uri)
    settings = {
        "num_samples": cfg.eval.num_samples,
        "feature_extractor": cfg.eval.feature_extractor,
        "real_split": cfg.eval.real_split,
        "generator": "raw" if args.raw else "ema",
        "seed": cfg.eval.seed,
        "checkpoint": str(ckpt),
    }
    new_run = run_id is None
    if new_run:
        exp = client.get_experiment(prepare_tracking(uri, args.experiment))  # artifacts next to a sqlite store
        tags = {"checkpoint": str(ckpt), "git_commit": git_commit(), "ray_job_id": ray_job_id()}
        run_id = client.create_run(
            exp.experiment_id, run_name=f"eval-{cfg.run.name}-step{step}", tags={k: v for k, v in tags.items() if v}
        ).info.run_id
    # The training run's params already hold its config's eval.* keys: settings of an evaluation go by step.
    prefix = "eval." if new_run else f"eval_step_{step}."
    now = mlflow.utils.time.get_current_time_millis()
    client.log_batch(run_id, metrics=[Metric(f"eval/{k}", v, now, step) for k, v in scores.items()])
    # One record per step and settings, so a re-evaluation with other settings keeps both.
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    record = f"evaluations/step_{step:06d}-{digest}.json"
    client.log_dict(run_id, {"step": step, "settings": settings, "scores": scores}, record)
    try:
        client.log_batch(run_id, params=[Param(prefix + k, str(v)) for k, v in settings.items()])
    except MlflowException as e:
        if e.error_code != "INVALID_PARAMETER_VALUE":
            raise
        print(
            f"note: step {step} was evaluated before with other settings (params keep the first); this one is {record}"
        )
    client.log_image(run_id, grid, key="eval_samples", step=step)
    if new_run:
        client.set_terminated(run_id)
    return run_id


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    from sagan.metrics import build_evaluator, feature_weights, real_shards
    from sagan.viz import grid_inputs, sample_grid

    ckpt = find_checkpoint(args.checkpoint).resolve()
    state = load_checkpoint(ckpt)
    bad = [o for o in args.overrides if not o.startswith(OVERRIDABLE)]
    if bad:
        raise UsageError(
            f"override {bad[0]} is not allowed here: only eval.*, data.* and mlflow.tracking_uri "
            "(the model is the checkpoint's)"
        )
    cfg = with_overrides(from_dict(state["config"]), args.overrides)
    if args.register:
        from pipelines.release.registry import check_name

        check_name(args.register)
        if args.raw:
            raise UsageError("--register registers the EMA generator, which --raw leaves out: drop one of them")
    if args.inception_weights:
        cfg.eval.inception_weights = absolute(args.inception_weights)
    step = int(state["step"])
    device = pick_device(args.device)
    real_shards(cfg)  # the cheap checks first: data, weights (training the sample classifier once), MLflow
    weights = feature_weights(cfg)
    uri, run_id = mlflow_target(args, cfg, state["extra"])
    # The real statistics and the extractor before a single sample is generated.
    evaluator = build_evaluator(cfg, device, stats_file=args.stats_file, weights=weights)
    G, _ = generator_from_state(state, ema=not args.raw, device=device)
    del state
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
        run_id = log_results(uri, run_id, args, cfg, ckpt, step, scores, grid)
    except Exception as e:  # noqa: BLE001 - the scores are printed above; say what failed in one line
        raise JobFailed(f"the scores could not be logged to MLflow at {uri}: {first_line(e)}") from None
    print(f"logged to MLflow run {run_id} at {uri}")
    return register(args, uri, run_id, G, cfg, ckpt, step, scores) if args.register else 0


def register(args, uri: str, run_id: str, G, cfg, ckpt: Path, step: int, scores: dict) -> int:
    """Log G as an MLflow model in `run_id`, with the scores just measured, and register it under --register."""
    from pipelines.release.registry import register_generator
    from pipelines.release.sources import shard_class_names

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
