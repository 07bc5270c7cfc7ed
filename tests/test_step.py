import pytest
import torch
from torch import nn

from sagan.config import load_config
from sagan.losses import hinge_d_loss, hinge_g_loss
from sagan.models import build_models
from sagan.step import EMA, Trainer


def tiny_config(*overrides):
    return load_config(None, ["model.ch=8", "model.z_dim=16", "model.num_classes=4", "train.batch_size=4", *overrides])


def tiny_trainer(*overrides, seed=0):
    cfg = tiny_config(*overrides)
    torch.manual_seed(seed)
    G, D = build_models(cfg.model)
    return Trainer(G, D, cfg), cfg


def real_batch(n=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=gen) * 2 - 1, torch.randint(0, 4, (n,), generator=gen)


def test_hinge_loss_on_known_scores():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2], relu(1 + fake) = [0, 1, 2]
    assert hinge_d_loss(real, fake).item() == pytest.approx(2.5 / 3 + 1.0)
    assert hinge_g_loss(fake).item() == pytest.approx(1.0 / 3)


def test_ema_averages_parameters_and_copies_buffers():
    model = nn.BatchNorm1d(2)
    ema = EMA(model, decay=0.9, start=0)
    with torch.no_grad():
        model.weight.fill_(2.0)  # EMA starts at 1.0 (BN's init)
        model.running_mean.fill_(5.0)
    ema.update(model, step=1)
    torch.testing.assert_close(ema.model.weight, torch.full((2,), 1.1))
    ema.update(model, step=2)
    torch.testing.assert_close(ema.model.weight, torch.full((2,), 1.19))
    torch.testing.assert_close(ema.model.running_mean, torch.full((2,), 5.0))
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_copies_before_its_start_step():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.999, start=10)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=3)
    torch.testing.assert_close(ema.model.weight, model.weight)


def test_train_step_changes_g_and_d_and_keeps_losses_finite():
    trainer, _ = tiny_trainer()
    g0 = [p.detach().clone() for p in trainer.G.parameters()]
    d0 = [p.detach().clone() for p in trainer.D.parameters()]
    for _ in range(2):
        metrics = trainer.train_step([real_batch()])
    assert set(metrics) == {"d_loss", "g_loss", "d_real", "d_fake"}
    assert all(torch.isfinite(v) for v in metrics.values())
    changed_g = sum(not torch.equal(a, b) for a, b in zip(g0, trainer.G.parameters()))
    changed_d = sum(not torch.equal(a, b) for a, b in zip(d0, trainer.D.parameters()))
    # gamma and the cBN tables of unsampled classes may stay put; nearly everything else moves.
    assert changed_g >= 0.8 * len(g0) and changed_d >= 0.8 * len(d0)
    assert trainer.step == 2
    ema_moved = sum(not torch.equal(a, b) for a, b in zip(g0, trainer.ema.model.parameters()))
    assert ema_moved >= 0.8 * len(g0)


def test_ttur_learning_rates_and_n_dis_d_steps_per_g_step():
    trainer, _ = tiny_trainer("optim.n_dis=2", "optim.lr_g=1e-4", "optim.lr_d=4e-4", "optim.betas=[0,0.9]")
    trainer.train_step([real_batch(seed=1), real_batch(seed=2)])
    assert trainer.opt_g.param_groups[0]["lr"] == 1e-4
    assert trainer.opt_d.param_groups[0]["lr"] == 4e-4
    assert trainer.opt_d.param_groups[0]["betas"] == (0.0, 0.9)
    d_state = next(iter(trainer.opt_d.state.values()))
    g_state = next(iter(trainer.opt_g.state.values()))
    assert d_state["step"].item() == 2 and g_state["step"].item() == 1


def test_train_step_rejects_wrong_number_of_batches():
    trainer, _ = tiny_trainer("optim.n_dis=2")
    with pytest.raises(ValueError, match="n_dis = 2"):
        trainer.train_step([real_batch()])


def test_bf16_autocast_step_on_cpu():
    trainer, _ = tiny_trainer("train.precision=bf16")
    d0 = [p.detach().clone() for p in trainer.D.parameters()]
    metrics = trainer.train_step([real_batch()])
    assert all(torch.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(a, b) for a, b in zip(d0, trainer.D.parameters()))
    assert all(p.dtype == torch.float32 for p in trainer.G.parameters())  # autocast, not a cast model


def test_step_is_deterministic_for_a_seed():
    a, _ = tiny_trainer()
    b, _ = tiny_trainer()
    torch.manual_seed(5)
    ma = a.train_step([real_batch()])
    torch.manual_seed(5)
    mb = b.train_step([real_batch()])
    assert ma["d_loss"].item() == mb["d_loss"].item()
    assert all(torch.equal(p, q) for p, q in zip(a.G.parameters(), b.G.parameters()))


def test_fp16_step_uses_loss_scaling_and_recovers_from_overflow():
    trainer, _ = tiny_trainer("train.precision=fp16")
    assert trainer.scaler_d.is_enabled() and trainer.scaler_g.is_enabled()
    d0 = [p.detach().clone() for p in trainer.D.parameters()]
    for _ in range(6):  # the first steps may overflow at the initial scale of 65536 and be skipped
        metrics = trainer.train_step([real_batch()])
    assert torch.isfinite(metrics["d_loss"]) and torch.isfinite(metrics["g_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(d0, trainer.D.parameters()))
    assert "scale" in trainer.state_dict()["scaler_d"]
