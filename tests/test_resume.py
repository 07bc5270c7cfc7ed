"""Resume checked on the driver: a changed model or a damaged latest checkpoint is found before any worker starts."""

import json
from pathlib import Path

import mlflow
import pytest
import torch

from pipelines.common.config import load_config
from pipelines.common.run_folder import RAY_SNAPSHOT
from pipelines.train import main
from pipelines.training.preflight import PreflightError
from pipelines.training.resume import check_resume
from sagan.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sagan.models import build_models
from sagan.step import Trainer
from tests.test_step import tiny_trainer
from tests.test_train import checkpoint_dirs, fit, tiny_cfg


def write_run(cfg, steps: list[int]) -> list[Path]:
    """A run folder as Ray Train leaves it: one checkpoint folder per step (oldest first) and the snapshot
    naming the last as latest."""
    trainer = Trainer(*build_models(cfg.model), cfg)
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    folders = []
    for i, step in enumerate(steps):
        trainer.step = step
        folder = run_dir / f"checkpoint_2026-01-01_00-00-0{i}.000000"
        save_checkpoint(folder / "checkpoint.pt", trainer, cfg)
        folders.append(folder)
    (run_dir / RAY_SNAPSHOT).write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": folders[-1].name}})
    )
    return folders


def run_cfg(tmp_path, *overrides):
    return load_config(
        None,
        [
            f"run.storage_path={tmp_path}",
            "run.name=r",
            "model.ch=8",
            "model.num_classes=4",
            "model.z_dim=16",
            *overrides,
        ],
    )


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "foreign": lambda p: torch.save({"weights": torch.zeros(2)}, p),
}


def test_a_run_without_ray_snapshot_starts_afresh(tmp_path):
    assert check_resume(run_cfg(tmp_path)).checkpoint is None


def test_intact_latest_is_resumed_as_ray_hands_it(tmp_path):
    cfg = run_cfg(tmp_path)
    folders = write_run(cfg, [2, 4])
    plan = check_resume(cfg)
    assert (plan.checkpoint, plan.step, plan.warning) == (str(folders[-1]), 4, None)
    assert plan.loop_config() == {"resume_from": None, "damaged": []}


def test_changed_model_setting_is_one_line_naming_old_and_new(tmp_path):
    write_run(run_cfg(tmp_path), [2])
    with pytest.raises(PreflightError) as e:
        check_resume(run_cfg(tmp_path, "model.ch=16", "model.g_attn=[]"))
    msg = str(e.value)
    assert "model.ch (8 -> 16), model.g_attn ([16] -> [])" in msg and "(model.ch=8 model.g_attn=[16])" in msg
    assert "new run.name" in msg and "\n" not in msg


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_falls_back_to_the_newest_intact_one_with_a_warning(tmp_path, damage):
    cfg = run_cfg(tmp_path)
    folders = write_run(cfg, [2, 4, 6])
    DAMAGE[damage](folders[2] / "checkpoint.pt")
    plan = check_resume(cfg)
    assert (plan.checkpoint, plan.step) == (str(folders[1]), 4)
    assert plan.loop_config() == {"resume_from": str(folders[1]), "damaged": [folders[2].name]}
    assert f"latest checkpoint of run r ({folders[2]}) is damaged" in plan.warning
    assert f"resuming from the newest intact one, {folders[1]} (step 4)" in plan.warning and "\n" not in plan.warning


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_no_intact_checkpoint_is_one_line_naming_the_latest(tmp_path, damage):
    cfg = run_cfg(tmp_path)
    folders = write_run(cfg, [2, 4])
    for folder in folders:
        DAMAGE[damage](folder / "checkpoint.pt")
    with pytest.raises(PreflightError) as e:
        check_resume(cfg)
    msg = str(e.value)
    assert msg.startswith("run r cannot resume: its latest checkpoint is damaged (") and str(folders[1]) in msg
    assert "choose a new run.name, or delete" in msg and "\n" not in msg


def test_state_dict_size_mismatch_is_one_line_naming_the_key_and_shapes(tmp_path):
    small, cfg = tiny_trainer("model.ch=8")
    path = save_checkpoint(tmp_path / "c.pt", small, cfg)
    wide, _ = tiny_trainer("model.ch=16")
    with pytest.raises(CheckpointError) as e:
        wide.load_state_dict(load_checkpoint(path))
    msg = str(e.value)
    assert (
        msg.startswith("the checkpoint's G.")
        and "has shape (" in msg
        and "but the model's has (" in msg
        and "\n" not in msg
    )


def test_changed_model_on_a_resumed_run_is_refused_before_any_worker(ray_session, digits, tmp_path, capsys):
    cfg = tiny_cfg(digits, tmp_path, "run.name=changed")
    folders = write_run(cfg, [2])
    capsys.readouterr()  # MLflow's lines from creating the store
    args = [
        f"data.train_shards={digits / 'train'}",
        f"run.storage_path={tmp_path / 'runs'}",
        "run.name=changed",
        f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
        "model.ch=16",
        "train.eval_every=0",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run changed was trained with other model settings: model.ch (8 -> 16)")
    assert len(err.splitlines()) == 1
    assert checkpoint_dirs(folders[0].parent) == folders  # no worker ran: nothing new written


def test_truncated_latest_resumes_from_the_older_checkpoint(ray_session, digits, tmp_path, capsys):
    cfg = tiny_cfg(digits, tmp_path, "run.name=trunc", "train.steps=4", "run.keep_checkpoints=2", "train.eval_every=0")
    fit(cfg)
    older, latest = checkpoint_dirs(Path(cfg.run.storage_path) / "trunc")
    DAMAGE["truncated"](latest / "checkpoint.pt")
    capsys.readouterr()
    args = [
        f"data.train_shards={digits / 'train'}",
        f"run.storage_path={tmp_path / 'runs'}",
        "run.name=trunc",
        f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
        "model.ch=8",
        "train.batch_size=4",
        "train.log_every=2",
        "train.ckpt_every=2",
        "train.sample_every=4",
        "train.steps=6",
        "run.keep_checkpoints=2",
        "train.eval_every=0",
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"warning: the latest checkpoint of run trunc ({latest}) is damaged" in err
    assert f"resuming from the newest intact one, {older} (step 2)" in err
    final = checkpoint_dirs(Path(cfg.run.storage_path) / "trunc")[-1]
    assert load_checkpoint(final / "checkpoint.pt")["step"] == 6
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    (run,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'trunc'")
    # Steps 3-4 ran twice: once before the checkpoint at 4 was damaged, once after resuming from 2.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "d_loss")] == [2, 4, 4, 6]
