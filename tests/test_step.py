import copy

import pytest
import torch
from torch import nn

from sagan.config import load_config
from sagan.losses import hinge_d_loss, hinge_g_loss
from sagan.models import build_models
from sagan.step import EMA, DivergenceGuard, Trainer


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


# ---------------------------------------------------------------- the fast path's levers, each at tiny size


def test_speed_auto_is_the_fast_path_on_gpu_and_fp32_eager_on_cpu():
    from sagan.speed import Speed

    cfg = tiny_config()
    assert cfg.train.precision == "auto" and cfg.train.channels_last is None and cfg.train.compile is None
    cpu, gpu = Speed.from_config(cfg.train, "cpu"), Speed.from_config(cfg.train, "cuda:0")
    assert (cpu.precision, cpu.channels_last, cpu.compile, cpu.fused_adam) == ("fp32", False, False, False)
    assert (gpu.precision, gpu.channels_last, gpu.compile, gpu.fused_adam) == ("bf16", True, True, True)
    chosen = tiny_config("train.precision=fp16", "train.channels_last=false", "train.compile=true")
    mixed = Speed.from_config(chosen.train, "cuda")
    assert (mixed.precision, mixed.channels_last, mixed.compile) == ("fp16", False, True)


def _trainer_with(speed, seed=0, *overrides):
    cfg = tiny_config(*overrides)
    G, D = build_models(cfg.model, seed=seed)
    return Trainer(G, D, cfg, speed)


def _run(trainer, steps=3):
    torch.manual_seed(11)
    return [{k: v.item() for k, v in trainer.train_step([real_batch(seed=i)]).items()} for i in range(steps)]


def _params(trainer):
    return torch.cat([p.detach().flatten() for p in [*trainer.G.parameters(), *trainer.D.parameters()]])


def _assert_same_run(a, b, atol):
    """Same losses over 3 steps within `atol` (relative to the loss, for losses above 1), and the same weight updates within 5% of their size (biases
    feeding a BatchNorm get zero gradient up to rounding, which Adam's normalisation turns into lr-sized moves)."""
    start = _params(b)
    assert torch.equal(_params(a), start)  # both from the same initial weights
    for ma, mb in zip(_run(a), _run(b)):
        for k in ma:
            assert abs(ma[k] - mb[k]) < atol * max(1.0, abs(mb[k])), (k, ma[k], mb[k])
    update_a, update_b = _params(a) - start, _params(b) - start
    assert (update_a - update_b).norm() <= 0.05 * update_b.norm(), ((update_a - update_b).norm(), update_b.norm())


def test_channels_last_step_matches_the_nchw_step():
    from sagan.speed import Speed, is_channels_last

    ref, fast = _trainer_with(Speed()), _trainer_with(Speed(channels_last=True))
    assert is_channels_last(fast.G) and is_channels_last(fast.D) and not is_channels_last(ref.G)
    # NHWC convolutions sum in another order (and another thread split when the machine is busy): differences
    # of 1.2e-4 and 8.8e-4 (on a d_loss of 2.72) were seen over the 3 steps.
    _assert_same_run(fast, ref, atol=1e-3)
    assert is_channels_last(fast.G)  # the optimizer step keeps the layout


def test_compiled_step_matches_eager_and_keeps_spectral_norm_state_and_keys():
    from sagan.speed import Speed

    eager = _trainer_with(Speed())
    compiled = _trainer_with(Speed(compile=True, compile_backend="aot_eager"))
    u = "blocks.0.conv1.parametrizations.weight.0._u"
    u0 = compiled.D.state_dict()[u].clone()
    _assert_same_run(compiled, eager, atol=1e-4)
    assert not torch.equal(compiled.D.state_dict()[u], u0)  # the power iteration ran inside the compiled graph
    for model in ("G", "D"):  # ... and every SN layer's vectors followed the eager ones
        ours, ref = getattr(compiled, model).state_dict(), getattr(eager, model).state_dict()
        for key in ref:
            if key.endswith(("._u", "._v")):
                torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=1e-3)
    assert compiled.G.state_dict().keys() == eager.G.state_dict().keys()  # checkpoints stay interchangeable
    assert not hasattr(compiled.ema.model, "_compiled_call_impl") or compiled.ema.model._compiled_call_impl is None


def test_fused_adam_step_matches_foreach_adam():
    from sagan.speed import Speed

    fused = _trainer_with(Speed(fused_adam=True))
    assert fused.opt_d.defaults["fused"] is True
    _assert_same_run(fused, _trainer_with(Speed()), atol=1e-5)


def test_g_step_computes_no_weight_gradients_for_d():
    trainer, _ = tiny_trainer()
    trainer.train_step([real_batch()])
    trainer.opt_d.zero_grad(set_to_none=True)
    trainer._g_step(4)
    assert all(p.grad is None for p in trainer.D.parameters())
    assert all(p.requires_grad for p in trainer.D.parameters())
    assert sum(p.grad is not None for p in trainer.G.parameters()) >= 0.8 * len(list(trainer.G.parameters()))


def test_channels_last_under_ddp_must_be_set_before_wrapping(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sagan.speed import Speed, is_channels_last, prepare_models

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cfg = tiny_config()
        G, D = build_models(cfg.model, seed=0)
        with pytest.raises(ValueError, match="prepare_models"):
            Trainer(DDP(G), DDP(D), cfg, Speed(channels_last=True))
        G, D = build_models(cfg.model, seed=0)
        prepare_models(Speed(channels_last=True), G, D)
        trainer = Trainer(DDP(G), DDP(D), cfg, Speed(channels_last=True))
        assert torch.isfinite(trainer.train_step([real_batch()])["d_loss"])
        assert is_channels_last(G) and is_channels_last(D)
    finally:
        dist.destroy_process_group()


def test_loss_monitor_reads_back_only_when_asked_and_names_the_first_bad_step(monkeypatch):
    from sagan.step import LossMonitor

    monitor = LossMonitor()
    assert monitor.read() == ({}, None)

    def no_sync(*args, **kwargs):
        raise AssertionError("host synchronisation inside the step")

    losses = [1.0, 2.0, float("nan"), 4.0, float("inf")]
    with monkeypatch.context() as m:  # update() must not read a tensor back to the host
        for name in ("item", "tolist", "__bool__", "__float__", "numpy"):
            m.setattr(torch.Tensor, name, no_sync)
        for step, value in enumerate(losses, start=1):
            monitor.update(step, {"d_loss": torch.tensor(value), "g_loss": torch.tensor(0.5)})
    values, bad = monitor.read()
    assert bad == 3 and values["g_loss"] == 0.5 and values["d_loss"] == float("inf")
    fine = LossMonitor()
    fine.update(1, {"d_loss": torch.tensor(1.5)})
    assert fine.read() == ({"d_loss": 1.5}, None)


@pytest.mark.parametrize("saved, resumed", [("fast", "plain"), ("plain", "fast")])
def test_resume_under_other_speed_settings_continues_the_same_optimisation(saved, resumed):
    from sagan.speed import Speed

    speeds = {"plain": Speed(), "fast": Speed(channels_last=True, fused_adam=True)}
    first = _trainer_with(speeds[saved])
    _run(first, steps=2)
    state = copy.deepcopy(first.state_dict())  # as from a file: nothing shared with `first`
    second = _trainer_with(speeds[resumed])
    second.load_state_dict(state)
    assert second.opt_d.param_groups[0]["fused"] == (True if resumed == "fast" else None)
    for opt in (second.opt_g, second.opt_d):  # moments laid out like their parameters
        for p, st in opt.state.items():
            assert st["exp_avg"].stride() == p.stride() and st["exp_avg_sq"].stride() == p.stride()
    before = _params(first)
    _run(first, steps=1)
    _run(second, steps=1)
    update_first, update_second = _params(first) - before, _params(second) - before
    assert (update_first - update_second).norm() <= 0.05 * update_first.norm()


def test_compile_and_channels_last_accept_auto_and_reject_other_words():
    from sagan.config import ConfigError

    cfg = tiny_config("train.compile=auto", "train.channels_last=false")
    assert cfg.train.compile is None and cfg.train.channels_last is False
    with pytest.raises(ConfigError, match="train.compile: expected bool"):
        tiny_config("train.compile=sometimes")
    with pytest.raises(ConfigError, match="train.compile_backend: 'warp' is not a torch.compile backend"):
        tiny_config("train.compile_backend=warp")


def test_divergence_guard_names_the_first_step_after_patience_readings_out_of_range():
    guard = DivergenceGuard(factor=100, patience=3)
    assert guard.check(2, {"d_loss": 2.0, "d_real": 5.0}) is None
    assert guard.check(4, {"d_loss": 1.5, "d_real": 40.0}) is None  # growing within range raises the range
    assert guard.check(6, {"d_loss": 6e13, "d_real": 1.0}) is None and guard.suspect
    assert guard.check(8, {"d_loss": 5e13, "d_real": 1.0}) is None
    message = guard.check(10, {"d_loss": 7e13, "d_real": 1.0})
    assert message.startswith("diverged at step 6: d_loss = 7e+13, beyond 100x its largest earlier |value| 2")


def test_divergence_guard_forgives_a_spike_and_can_be_off():
    guard = DivergenceGuard(factor=100, patience=2)
    assert guard.check(2, {"g_loss": 3.0}) is None
    assert guard.check(4, {"g_loss": 1e6}) is None and guard.suspect
    assert guard.check(6, {"g_loss": 3.0}) is None and not guard.suspect
    assert guard.largest == {"g_loss": 3.0}  # the spike did not widen the range
    off = DivergenceGuard(factor=0, patience=1)
    assert off.check(2, {"g_loss": 1e30}) is None
