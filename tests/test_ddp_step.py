"""The training step under torch DistributedDataParallel (gloo, 2 CPU processes), without Ray."""

import copy
import os
import re
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from sagan.models import build_models
from sagan.speed import ddp_without_forward_buffer_sync
from sagan.step import Trainer


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    from tests.test_step import real_batch, tiny_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = tiny_config()
    torch.manual_seed(0)  # same init on both ranks (DDP also broadcasts rank 0's weights)
    G, D = build_models(cfg.model)
    trainer = Trainer(DDP(G), DDP(D), cfg)
    torch.manual_seed(100 + rank)  # different latents and data per rank, as in real training
    for step in range(3):
        trainer.train_step([real_batch(seed=10 * step + rank)])
    state = {k: trainer.state_dict()[k] for k in ("G", "D", "G_ema")}
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_ranks_stay_identical(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for net in ("G", "D", "G_ema"):
        params = [k for k in r0[net] if "running" not in k and "num_batches" not in k]
        assert params
        for k in params:
            assert torch.equal(r0[net][k], r1[net][k]), f"{net}.{k} differs between ranks"


# ---------------------------------------------------------------- elastic: virtual ranks served by fewer workers


def _virtual_rank_batches(step: int, ranks: tuple[int, ...]):
    """Step `step`'s real batch of each of `ranks`, one after the other (as an elastic worker's loader gives)."""
    from tests.test_step import real_batch

    parts = [real_batch(seed=10 * step + r) for r in ranks]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


# G's convolutions that feed a BatchNorm: their biases are cancelled by it, so their gradients are float noise,
# which Adam scales up to steps of about the learning rate in a direction that depends on summation order. They
# change nothing G computes (a running mean follows them) and are left out of the comparison.
NOISE_ONLY = re.compile(r"^blocks\.\d+\.(conv1|conv2|shortcut)\.bias$")


def _fixed_worker(rank, world, port, out_dir):
    """One of 2 workers, each serving its own virtual rank, for 6 steps (buffers not broadcast, as
    pipelines/training does); rank 0 saves the state after steps 3 and 6, and its losses."""
    from tests.test_step import tiny_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = tiny_config()
    G, D = build_models(cfg.model, seed=0)
    no_sync = ddp_without_forward_buffer_sync()
    trainer = Trainer(DDP(G, **no_sync), DDP(D, **no_sync), cfg)
    losses, states = [], {}
    for step in range(6):
        losses.append(trainer.train_step([_virtual_rank_batches(step, (rank,))], ranks=(rank,)))
        if step in (2, 5):
            states[step + 1] = copy.deepcopy(trainer.state_dict())  # a copy: the live tensors move on
    if rank == 0:
        torch.save({"states": states, "losses": losses}, os.path.join(out_dir, "fixed.pt"))
    dist.destroy_process_group()


def _assert_same(elastic: dict, fixed: dict) -> None:
    for net in ("G", "D", "G_ema"):
        for key, value in fixed[net].items():  # weights, spectral-norm vectors, BN running statistics
            if NOISE_ONLY.match(key):
                continue
            atol = 1e-3 if key.endswith("running_mean") else 1e-4  # the running means take in those biases
            assert torch.allclose(elastic[net][key].float(), value.float(), rtol=1e-3, atol=atol), f"{net}.{key}"


def test_one_worker_serving_two_virtual_ranks_trains_as_two_workers_do(tmp_path):
    """The elastic step: a worker serving virtual ranks 0 and 1 (micro-batches, each with its own latents and
    its own batch statistics, buffers moved by the first alone, gradients weighted 1/2) ends each step with the
    weights, buffers and logged losses of a 2-worker DDP run, up to float rounding (the sums run in another
    order; 1e-3 relative on the weights after 3 steps, about 1e-6 on the losses): from the start, and after a
    shrink from 2 workers to 1 at step 3's checkpoint."""
    from tests.test_step import tiny_config

    mp.spawn(_fixed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    fixed = torch.load(tmp_path / "fixed.pt", weights_only=True)
    cfg = tiny_config()

    def one_worker(steps, state=None):
        trainer = Trainer(*build_models(cfg.model, seed=0), cfg)
        if state is not None:
            trainer.load_state_dict(state)
        losses = [trainer.train_step([_virtual_rank_batches(s, (0, 1))], ranks=(0, 1), weight=0.5) for s in steps]
        return trainer.state_dict(), losses

    for steps, state, end in ((range(3), None, 3), (range(3, 6), fixed["states"][3], 6)):
        elastic, losses = one_worker(steps, state)
        _assert_same(elastic, fixed["states"][end])
        for a, b in zip(losses, fixed["losses"][steps.start : steps.stop]):  # the first virtual rank's, on rank 0
            assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in b), (a, b)
    # The comparison can fail: a second micro-batch that draws the first one's latents gives other weights.
    wrong = Trainer(*build_models(cfg.model, seed=0), cfg)
    for step in range(3):
        wrong.train_step([_virtual_rank_batches(step, (0, 1))], ranks=(0, 0), weight=0.5)
    with pytest.raises(AssertionError):
        _assert_same(wrong.state_dict(), fixed["states"][3])


def test_the_no_buffer_sync_keyword_is_the_one_the_installed_torch_takes():
    """torch 2.13 renamed DDP's broadcast_buffers to forward_sync_buffers; the GPU image has torch 2.11, where the
    new name is a TypeError at the first prepare_model."""

    class Before213:
        def __init__(self, module, device_ids=None, broadcast_buffers=True, bucket_cap_mb=None): ...

    class From213:
        def __init__(self, module, broadcast_buffers=None, forward_sync_buffers=None): ...

    assert ddp_without_forward_buffer_sync(Before213) == {"broadcast_buffers": False}
    assert ddp_without_forward_buffer_sync(From213) == {"forward_sync_buffers": False}
