"""Resume checked on the driver before any worker starts: the checkpoint Ray would hand the workers is read
once here, so a changed model or a damaged file is one line, and a damaged latest falls back to an older one."""

import json
from dataclasses import dataclass, field

from pipelines.common.config import Config
from pipelines.common.run_folder import CHECKPOINT_FILE, RunFolder, load_checkpoint_in
from pipelines.training.preflight import PreflightError
from sagan.checkpoint import CheckpointError
from sagan.config import to_dict
from sagan.folder import Folder


@dataclass
class ResumePlan:
    """Where a run resumes: `checkpoint` (a folder) at `step`, or nowhere (a fresh run). `damaged` names the
    folders Ray may hand the workers that must not be loaded; `warning` is one line for the user, or None."""

    checkpoint: str | None = None
    step: int | None = None
    damaged: list[str] = field(default_factory=list)
    warning: str | None = None

    def loop_config(self) -> dict:
        """The train loop's keys: the fallback to load when Ray hands a damaged checkpoint."""
        return {"resume_from": self.checkpoint if self.damaged else None, "damaged": list(self.damaged)}


def _value(v) -> str:
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)


def model_changes(saved: dict, cfg: Config) -> list[tuple[str, object, object]]:
    """(key, old, new) for every model.* setting that differs between a checkpoint's config and `cfg`."""
    old, new = saved.get("model", {}), to_dict(cfg)["model"]
    return [(k, old[k], new[k]) for k in new if k in old and old[k] != new[k]]


def check_resume(cfg: Config) -> ResumePlan:
    """The checkpoint a relaunch of `cfg.run.name` resumes from, read and checked on this machine (CPU).

    PreflightError when it was trained with other model.* settings, or when no checkpoint of the run is intact.
    On object storage each checkpoint looked at is downloaded once to a temporary file.
    """
    folder = RunFolder.of(cfg)
    latest = folder.ray_latest()
    if latest is None:  # a new run
        return ResumePlan()
    run_dir = folder.uri
    # Newest first: Ray names the folders checkpoint_<date>_<time>.<microseconds>, which sort in time order.
    older = folder.checkpoints_before(latest)
    damaged, first_error = [], None
    for name in [latest, *older]:
        try:
            state = load_checkpoint_in(Folder(f"{folder.uri}/{name}"), CHECKPOINT_FILE, folder.checkpoint_file(name))
            break
        except CheckpointError as e:
            damaged.append(name)
            first_error = first_error or e
    else:
        raise PreflightError(
            f"run {cfg.run.name} cannot resume: its latest checkpoint is damaged ({first_error}) and "
            f"no older one in {run_dir} is intact; choose a new run.name, or delete {run_dir} "
            "to start this one afresh"
        )
    changes = model_changes(state["config"], cfg)
    if changes:
        diff = ", ".join(f"model.{k} ({_value(a)} -> {_value(b)})" for k, a, b in changes)
        keep = " ".join(f"model.{k}={_value(a)}" for k, a, _ in changes)
        raise PreflightError(
            f"run {cfg.run.name} was trained with other model settings: {diff}; its checkpoints "
            f"cannot be loaded into this model. Choose a new run.name, or set the old values "
            f"({keep})"
        )
    warnings = []
    if damaged:
        warnings.append(
            f"the latest checkpoint of run {cfg.run.name} ({run_dir}/{latest}) is damaged ({first_error}); "
            f"resuming from the newest intact one, {run_dir}/{name} (step {state['step']})"
        )
    planned = state.get("extra", {}).get("virtual_ranks")
    if planned is not None and planned != cfg.scaling.max_workers:
        warnings.append(
            f"run {cfg.run.name} planned its data for {planned} workers and goes on with "
            f"{cfg.scaling.max_workers} (scaling.num_workers, its maximum when elastic): from step {state['step']} "
            f"on, the global batch is {cfg.train.batch_size * cfg.scaling.max_workers}, not "
            f"{cfg.train.batch_size * planned}, and the samples are not those the first launch's schedule had; keep "
            f"the maximum at {planned} for an unchanged run"
        )
    warning = "; ".join(warnings) or None
    return ResumePlan(f"{run_dir}/{name}", int(state["step"]), damaged, warning)
