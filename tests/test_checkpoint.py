import os

import pytest
import torch

from sagan.checkpoint import CheckpointError, load_checkpoint, load_generator, save_checkpoint
from sagan.step import trainer_from_checkpoint
from tests.test_step import real_batch, tiny_trainer


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip_is_bit_exact(tmp_path):
    trainer, cfg = tiny_trainer()
    trainer.train_step([real_batch()])
    path = save_checkpoint(tmp_path / "ckpt.pt", trainer, cfg, extra={"mlflow_run_id": "abc"})
    restored, restored_cfg = trainer_from_checkpoint(path)
    assert restored_cfg == cfg
    _assert_same(trainer.state_dict(), restored.state_dict())
    assert load_checkpoint(path)["extra"] == {"mlflow_run_id": "abc"}


def test_resumed_trainer_continues_exactly_like_the_original(tmp_path):
    trainer, cfg = tiny_trainer()
    trainer.train_step([real_batch()])
    restored, _ = trainer_from_checkpoint(save_checkpoint(tmp_path / "c.pt", trainer, cfg))
    for t in (trainer, restored):
        torch.manual_seed(11)
        t.train_step([real_batch(seed=3)])
    _assert_same(trainer.state_dict(), restored.state_dict())


def test_load_generator_uses_ema_weights(tmp_path):
    trainer, cfg = tiny_trainer()
    trainer.train_step([real_batch()])
    path = save_checkpoint(tmp_path / "c.pt", trainer, cfg)
    G, _ = load_generator(path)
    assert not G.training
    _assert_same(G.state_dict(), trainer.ema.model.state_dict())


def test_truncated_file_fails_cleanly(tmp_path):
    trainer, cfg = tiny_trainer()
    path = save_checkpoint(tmp_path / "c.pt", trainer, cfg)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)


def test_foreign_files_fail_cleanly(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a SAGAN checkpoint"):
        load_checkpoint(other)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_executes_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "sagan-checkpoint", "x": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="is not a plain checkpoint [(]it contains code objects") as e:
        load_checkpoint(path)
    assert not marker.exists()
    assert (
        "weights_only" not in str(e.value) and len(str(e.value).splitlines()) == 1
    )  # never torch's hint to turn it off


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer, cfg = tiny_trainer()
    path = save_checkpoint(tmp_path / "c.pt", trainer, cfg)
    before = path.read_bytes()
    trainer.train_step([real_batch()])

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, trainer, cfg)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.pt"]


def test_extra_must_be_plain_values_so_the_file_stays_loadable(tmp_path):
    trainer, cfg = tiny_trainer()
    with pytest.raises(TypeError, match="extra.run_dir: PosixPath is not a plain value"):
        save_checkpoint(tmp_path / "c.pt", trainer, cfg, extra={"run_dir": tmp_path})
    assert not (tmp_path / "c.pt").exists()


def test_marker_without_the_state_is_a_clean_error(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"format": "sagan-checkpoint", "version": 1}, path)
    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(path)


def test_resume_applies_the_current_learning_rates(tmp_path):
    from sagan.checkpoint import load_checkpoint as load
    from sagan.models import build_models
    from sagan.step import Trainer

    trainer, cfg = tiny_trainer()
    trainer.train_step([real_batch()])
    path = save_checkpoint(tmp_path / "c.pt", trainer, cfg)
    new_cfg, _ = tiny_trainer("optim.lr_d=1e-5", "optim.lr_g=2e-5")[1], None
    G, D = build_models(new_cfg.model)
    resumed = Trainer(G, D, new_cfg)
    resumed.load_state_dict(load(path))
    assert resumed.opt_d.param_groups[0]["lr"] == 1e-5 and resumed.opt_g.param_groups[0]["lr"] == 2e-5
    assert next(iter(resumed.opt_d.state.values()))["step"].item() == 1  # moments kept
