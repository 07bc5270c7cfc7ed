"""Sweep SAGAN's TTUR learning-rate ratio x attention placement with Ray Tune (ASHA on the in-loop FID),
reported in MLflow: one parent run per sweep, one child run per trial, a table, heatmap and curves.

    python pipelines/tune.py                                    # configs/tune_demo.yaml: digits, local Ray
    python pipelines/tune.py --config configs/tune_imagenet128.yaml
    ray job submit --working-dir . -- python pipelines/tune.py --config configs/tune_imagenet128.yaml

Each trial is a full Ray Train run (pipelines/train.py's loop) with its own workers. Interrupt a sweep
(Ctrl-C, or the driver killed) and run the same command again to continue it: finished trials are kept,
unfinished ones resume from their last checkpoint. The search space is the `tune` section (docs/configuration.md).
"""

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.common.cli import config_args
from pipelines.common.config import load_config
from pipelines.common.ray_address import connect_ray
from pipelines.common.run_folder import RunFolder
from pipelines.sweep.space import check_same_sweep, check_sweep
from pipelines.tracking.store import TrackingError, check_tracking, default_tracking_uri, prepare_tracking
from pipelines.training.preflight import (
    check_cluster,
    check_inputs,
    multinode_warnings,
    prepare_evaluation,
    resolve_paths,
    verify_shards,
)
from pipelines.training.run_lock import run_lock
from sagan.config import dump_yaml
from sagan.errors import JobFailed, command, first_line

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tune_demo.yaml"


def parse_args(argv=None):
    return config_args("tune.py", __doc__, DEMO_CONFIG, "tune.ratio=[1,4] tune.steps=2000", argv)


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = resolve_paths(load_config(args.config or DEMO_CONFIG, args.overrides))
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    combos = check_sweep(cfg)
    check_tracking(default_tracking_uri(cfg.mlflow.tracking_uri))  # seconds, before Ray starts
    check_inputs(cfg)  # the data against its manifest, the storage: no Ray needed
    with run_lock(cfg.run.storage_path, cfg.tune.name):  # before Ray starts: a refused launch costs nothing
        return sweep(cfg, combos)


def sweep(cfg, combos) -> int:
    """Check the cluster and the inputs, run or resume the sweep, report; the exit status."""
    # Ray Tune and MLflow load here, not at the top: a launch refused by main's checks costs no import (seconds).
    import mlflow
    import ray

    from pipelines.sweep.outcomes import best_row, records_from_results, trial_rows
    from pipelines.sweep.report import table_markdown, write_report
    from pipelines.sweep.space import metric_mode
    from pipelines.sweep.trials import mark_interrupted, parent_run
    from pipelines.sweep.tuner import can_restore, run_sweep
    from pipelines.tracking.delivery import bound_requests
    from pipelines.tracking.kept import deliver_kept

    folder = RunFolder(cfg.run.storage_path, cfg.tune.name)
    sweep_dir = folder.uri  # a string: s3://... is no local Path
    submitted = bool(os.environ.get("RAY_ADDRESS"))
    connect_ray()  # joins the cluster when submitted as a job (RAY_ADDRESS), else starts a local one
    bound_requests()  # after ray.init: a local cluster's processes keep their own settings (pipelines/tracking)
    sweep_id = check_same_sweep(sweep_dir, combos, cfg, restorable=can_restore(sweep_dir))
    check_cluster(cfg, ray.cluster_resources())
    verify_shards(cfg)  # once per sweep, not per trial
    prepare_evaluation(cfg)
    uri = default_tracking_uri(cfg.mlflow.tracking_uri)
    experiment_id = prepare_tracking(uri, cfg.tune.experiment)
    try:
        client = mlflow.MlflowClient(uri)
        parent_id = parent_run(client, experiment_id, cfg, sweep_id)
    except Exception as e:  # noqa: BLE001 - any failure to reach the store is the user's to fix
        raise TrackingError(f"MLflow tracking at {uri} is not usable: {first_line(e)}") from None
    for line in multinode_warnings(cfg, uri, sum(n["Alive"] for n in ray.nodes()), submitted):
        print(f"warning: {line}", file=sys.stderr)
    print(
        f"sweep {cfg.tune.name}: {len(combos)} combination(s) x {cfg.tune.num_samples} sample(s), "
        f"{cfg.tune.steps} steps each, ASHA on {cfg.tune.metric}; trials in {sweep_dir}; "
        f"MLflow parent run {parent_id} in experiment {cfg.tune.experiment} at {uri}",
        flush=True,
    )
    results, _ = run_sweep(cfg, combos, uri, experiment_id, parent_id, sweep_dir)

    # The report comes from what the trials measured (their results in Tune), and only after what their rank 0
    # kept during an outage of the store has been delivered, so the server's histories match the table.
    records = records_from_results(results, cfg.tune.metric, sweep_dir)
    for rec in records:
        trial = RunFolder(f"{sweep_dir}/train", f"trial-{rec['trial_id']}")
        deliver_kept(trial, uri, f"trial {rec['trial_id']}'s rank 0 had kept")
    rows, curves = trial_rows(cfg, records)
    best = best_row(rows, metric_mode(cfg))
    print("\n" + table_markdown(rows, cfg.tune.metric))
    if best:
        print(
            f"best: trial {best['trial']}, {cfg.tune.metric} {best['best']:.4g} (ratio {best['ratio']:g}, "
            f"lr_g {best['lr_g']:g}, attention G{best['g_attn']} D{best['d_attn']}, seed {best['seed']})"
        )
    interrupted = any(r["status"] not in ("completed", "stopped", "failed") for r in rows)
    try:
        write_report(client, experiment_id, parent_id, cfg, rows, curves)
        if not interrupted:
            client.set_terminated(parent_id, "FINISHED")
    except Exception as e:  # noqa: BLE001 - the trials' results are safe in Tune either way
        raise JobFailed(
            f"the sweep ran, but its report could not be written to MLflow at {uri}: {first_line(e)}; "
            "rerun the same command to write it"
        ) from None
    print(
        f"report: MLflow run {parent_id} (artifacts report/: trials.csv, trials.md, heatmap.png, curves.png, "
        f"best_config.yaml); browse with: mlflow ui --backend-store-uri {uri}"
    )
    if interrupted:
        mark_interrupted(client, experiment_id, cfg.tune.name, parent_id)
        print("the sweep was interrupted: run the same command again to continue it", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
