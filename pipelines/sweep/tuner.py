"""The sweep on Ray Tune: a new Tuner over the trials with ASHA on the in-loop metric, or the sweep restored
from its folder (unfinished trials resume from their checkpoints)."""

import logging
import os
import time

import ray
from ray import tune
from ray.tune import Callback
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from pipelines.sweep.asha import ResumableASHA
from pipelines.sweep.report import ReportOnTrialEnd
from pipelines.sweep.space import concurrency, metric_mode, param_space
from pipelines.sweep.trials import trainable, trial_dirname
from sagan.errors import UsageError
from sagan.storage import ray_storage


def tune_storage(sweep_dir: str) -> tuple[str, object]:
    """(path, filesystem) as Tune takes a sweep's folder: with an S3-compatible endpoint, its filesystem and the
    path inside it; else the path or URL itself and None."""
    storage = ray_storage(sweep_dir)
    return storage["storage_path"], storage.get("storage_filesystem")


def can_restore(sweep_dir: str) -> bool:
    """Whether Tune has a saved sweep in `sweep_dir` (a path or an object-storage URL)."""
    path, fs = tune_storage(sweep_dir)
    return tune.Tuner.can_restore(path, storage_filesystem=fs)


def run_sweep(cfg, combos, uri: str, experiment_id: str, parent_id: str, sweep_dir: str):
    """Start the sweep, or restore it from `sweep_dir`; returns Tune's ResultGrid and whether it was restored."""
    # Rank 0 reports the in-loop metric at evaluation steps only; the other reports (losses) lack it.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    fn = trainable(cfg, uri, parent_id, sweep_dir)
    path, fs = tune_storage(sweep_dir)
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        print(f"resuming sweep {cfg.tune.name} from {sweep_dir}", flush=True)
        try:
            tuner = tune.Tuner.restore(
                path, trainable=fn, resume_unfinished=True, resume_errored=False, storage_filesystem=fs
            )
        except (ModuleNotFoundError, AttributeError) as e:  # Tune pickled the sweep's classes by module path
            raise UsageError(
                f"sweep {cfg.tune.name} in {sweep_dir} was saved by an older version of this code ({e}); "
                "finish it with that version, or choose a new tune.name (or delete the folder) to start afresh"
            ) from None
        return tuner.fit(), True
    # Rungs sit at grace_period x reduction_factor^k up to max_t. With max_t one below the trial length, no rung
    # falls on a trial's last report, and stop_last_trials=False lets a trial that reached it finish by itself
    # instead of Tune killing its workers while they write the last checkpoint.
    asha = ResumableASHA(
        time_attr="step",
        metric=cfg.tune.metric,
        mode=metric_mode(cfg),
        max_t=cfg.tune.steps - 1,
        grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
        stop_last_trials=False,
    )
    tuner = tune.Tuner(
        fn,
        param_space=param_space(cfg, combos),
        tune_config=tune.TuneConfig(
            scheduler=asha,
            num_samples=cfg.tune.num_samples,
            reuse_actors=False,
            max_concurrent_trials=concurrency(cfg, ray.cluster_resources()),
            trial_dirname_creator=trial_dirname,
            trial_name_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=cfg.tune.name,
            **ray_storage(cfg.run.storage_path),  # an S3-compatible endpoint's filesystem (AWS_ENDPOINT_URL)
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=0),  # Train retries workers itself
            callbacks=[ReportOnTrialEnd(cfg, uri, experiment_id, parent_id, sweep_dir), ReleasePlacementGroups()],
        ),
    )
    return tuner.fit(), False


class ReleasePlacementGroups(Callback):
    """Removes an ended trial's worker placement groups from the driver. Ray Train's PlacementGroupCleaner should,
    but when it fails (it died connecting to another Ray cluster on the same host, see
    pipelines.common.ray_address) the group stays CREATED, holding its CPUs, and the next trial's workers wait
    for them. Rank 0 names its group in every report (pipelines.training.loop.Loop.report)."""

    GRACE_S = 15.0  # after the trial ended: its actor, and with it the Train controller, are gone by then

    def __init__(self, grace_s: float = GRACE_S):
        self.groups: dict[str, set[str]] = {}
        self.ended: dict[str, float] = {}  # trial id -> when it ended
        self.grace_s = grace_s

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("placement_group"):
            self.groups.setdefault(trial.trial_id, set()).add(result["placement_group"])

    def release(self, trial_id: str) -> list[str]:
        """Remove the trial's groups that are still there; returns their ids."""
        from ray._raylet import PlacementGroupID

        removed = []
        for hex_id in sorted(self.groups.pop(trial_id, ())):
            group = PlacementGroup(PlacementGroupID.from_hex(hex_id))
            try:
                if placement_group_table(group).get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
                    remove_placement_group(group)
                    removed.append(hex_id)
            except Exception as e:  # noqa: BLE001 - a group Ray removed meanwhile; the sweep goes on either way
                logging.getLogger("sagan.tune").debug(f"placement group {hex_id}: {e}")
        if removed:
            logging.getLogger("sagan.tune").warning(
                f"trial {trial_id} ended with its worker placement group(s) {', '.join(removed)} still held; "
                "removed them"
            )
        return removed

    def _ended(self, trial) -> None:
        # Not at once: Tune calls this before it stops the trial's actor, and removing the group under a live
        # Train controller would count as a worker failure, which it would retry with a new group.
        self.ended.setdefault(trial.trial_id, time.monotonic())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        for trial_id in [t for t, at in self.ended.items() if now - at >= self.grace_s]:
            del self.ended[trial_id]
            self.release(trial_id)

    def on_experiment_end(self, trials, **info):
        for trial_id in list(self.ended):
            del self.ended[trial_id]
            self.release(trial_id)
