"""Train SAGAN with Ray Train (DDP over every worker the cluster gives), tracked in MLflow.

    python pipelines/train.py                                   # the demo config, local Ray, local MLflow
    python pipelines/train.py --config configs/imagenet128.yaml scaling.num_workers=16
    ray job submit --working-dir . -- python pipelines/train.py --config configs/imagenet128.yaml

Overrides are dotted key=value pairs (docs/configuration.md lists every key; --print-config prints them resolved). Running again with the same
run.name resumes from the run's last checkpoint. The global batch is train.batch_size x scaling.num_workers (its MAX when elastic: [MIN, MAX]).
"""

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.common.cli import config_args
from pipelines.common.config import Config, load_config
from pipelines.common.ray_address import connect_ray
from pipelines.common.run_folder import RunFolder
from pipelines.tracking.kept import deliver_kept, pending_here, shown
from pipelines.tracking.pending import deliver_pending
from pipelines.tracking.store import check_tracking, default_tracking_uri, end_run, prepare_tracking, refused_everything
from pipelines.training.placement import fit
from pipelines.training.preflight import (
    check_cluster,
    check_inputs,
    multinode_warnings,
    prepare_evaluation,
    resolve_paths,
    verify_shards,
)
from pipelines.training.resume import ResumePlan, check_resume
from pipelines.training.run_lock import run_lock
from pipelines.training.stop import raise_if_stopped
from pipelines.training.trainer import build_trainer, open_tracking_run
from sagan.config import dump_yaml
from sagan.errors import JobFailed, command

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def parse_args(argv=None):
    return config_args("train.py", __doc__, DEMO_CONFIG, "optim.lr_d=4e-4 model.g_attn=[32,64]", argv)


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = resolve_paths(load_config(args.config or DEMO_CONFIG, args.overrides))
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    check_tracking(default_tracking_uri(cfg.mlflow.tracking_uri))  # seconds, before Ray starts
    check_inputs(cfg)  # the data against its manifest, the storage: no Ray needed
    with run_lock(cfg.run.storage_path, cfg.run.name):  # before Ray starts: a refused launch costs nothing
        return launch(cfg)


def launch(cfg: Config) -> int:
    """Check the resume, start (or join) Ray, check the cluster, verify the data, fill the eval cache, make the
    MLflow experiment, train; the exit status."""
    uri = default_tracking_uri(cfg.mlflow.tracking_uri)
    resume = check_resume(cfg)  # the checkpoint the workers will load, read once here
    if resume.warning:
        print(f"warning: {resume.warning}", file=sys.stderr)
    import ray  # here, not at the top: a launch refused above costs no Ray import (~1.5 s)

    submitted = bool(os.environ.get("RAY_ADDRESS"))
    connect_ray()  # joins the cluster when submitted as a job (RAY_ADDRESS), else starts a local one
    check_cluster(cfg, ray.cluster_resources())
    verify_shards(cfg)  # sha256 of every shard (data.verify=full), before any worker starts
    prepare_evaluation(cfg)
    prepare_tracking(uri, cfg.mlflow.experiment)
    for line in multinode_warnings(cfg, uri, sum(n["Alive"] for n in ray.nodes()), submitted):
        print(f"warning: {line}", file=sys.stderr)
    print(
        f"training {cfg.run.name}: {cfg.scaling.describe()}, global batch "
        f"{cfg.train.batch_size * cfg.scaling.max_workers}, {cfg.train.steps} steps; "
        f"checkpoints in {RunFolder.of(cfg).uri}; MLflow at {uri}",
        flush=True,
    )
    return train(cfg, uri, resume)


def train(cfg: Config, uri: str, resume: ResumePlan) -> int:
    """Fit, with the MLflow run opened here before any worker starts and closed here when the run fails."""
    folder = RunFolder.of(cfg)
    deliver_kept(folder, uri, "the last launch of this run had kept")  # before this launch's points
    raise_if_stopped(cfg)
    run_id = open_tracking_run(cfg, uri, continuing=resume.checkpoint is not None)
    status = "FAILED"  # unless fit() returns; rank 0 ends a finished run itself, after its last metrics
    try:
        result = fit(build_trainer(cfg, uri, run_id, resume=resume), cfg)  # bounded wait for the workers
        status = None
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception:
        raise_if_stopped(cfg)  # a stopped run: one line naming the step or the file, not the workers' traceback
        raise
    finally:
        with pending_here(folder) as pending:  # on object storage: gathered from the run's prefix, and back
            deliver_pending(pending, uri, "rank 0 had kept", shown=shown(folder))
            if status:
                end_run(uri, run_id, status, pending)
            lost = None if status else refused_everything(uri, run_id, pending)
    ckpt = result.checkpoint.path if result.checkpoint else None
    if lost:
        raise JobFailed(f"the run trained (last checkpoint {ckpt}) but its record is lost: {lost}")
    print(f"done: last checkpoint {ckpt}\nbrowse the run: mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
