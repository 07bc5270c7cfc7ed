"""Train SAGAN with Ray Train (DDP over every worker the cluster gives), tracked in MLflow.

    python pipelines/train.py                                   # the demo config, local Ray, local MLflow
    python pipelines/train.py --config configs/imagenet128.yaml scaling.num_workers=16
    ray job submit --working-dir . -- python pipelines/train.py --config configs/imagenet128.yaml

Overrides are dotted key=value pairs (see sagan/config.py for every key). Running again with the same
run.name resumes from the run's last checkpoint. The global batch is train.batch_size x scaling.num_workers.
"""

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.common import TrackingError, check_tracking, default_tracking_uri, first_line, prepare_tracking  # noqa: E402
from pipelines.launch import PreflightError, build_trainer, preflight, prepare_evaluation, resolve_paths, verify_shards  # noqa: E402, F401
from sagan.config import ConfigError, load_config  # noqa: E402

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"YAML config (default: {DEMO_CONFIG.relative_to(DEMO_CONFIG.parent.parent)})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr_d=4e-4 model.g_attn=[32,64]")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_paths(load_config(args.config or DEMO_CONFIG, args.overrides))
        check_tracking(default_tracking_uri(cfg.mlflow.tracking_uri))  # seconds, before Ray starts
    except (ConfigError, TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray

    if not ray.is_initialized():
        ray.init()  # joins the cluster when submitted as a job (RAY_ADDRESS), else starts a local one
    try:
        preflight(cfg, ray.cluster_resources())
        verify_shards(cfg)  # sha256 of every shard (data.verify=full), before any worker starts
        prepare_evaluation(cfg)
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    uri = default_tracking_uri(cfg.mlflow.tracking_uri)
    try:
        prepare_tracking(uri, cfg.mlflow.experiment)
    except Exception as e:  # noqa: BLE001 - any failure to reach the store is the user's to fix
        print(f"error: MLflow tracking at {uri} is not usable: {first_line(e)}", file=sys.stderr)
        return 2
    if uri.startswith("sqlite:") and (os.environ.get("RAY_ADDRESS") or sum(n["Alive"] for n in ray.nodes()) > 1):
        print(f"warning: MLflow store {uri} is a file on this node, but rank 0 may run on another; on a "
              "multi-node cluster set mlflow.tracking_uri to a tracking server (mlflow server ...)", file=sys.stderr)  # fmt: skip
    print(f"training {cfg.run.name}: {cfg.scaling.num_workers} worker(s), global batch "
          f"{cfg.train.batch_size * cfg.scaling.num_workers}, {cfg.train.steps} steps; "
          f"checkpoints in {cfg.run.storage_path}/{cfg.run.name}; MLflow at {uri}", flush=True)  # fmt: skip
    from pipelines.train_loop import NonFiniteLossError, raise_if_diverged

    try:
        raise_if_diverged(cfg)
        try:
            result = build_trainer(cfg, uri).fit()
        except Exception:
            raise_if_diverged(cfg)  # a diverged run: one line naming the step, not the workers' traceback
            raise
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ckpt = result.checkpoint.path if result.checkpoint else None
    print(f"done: last checkpoint {ckpt}\nbrowse the run: mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
