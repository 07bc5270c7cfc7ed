"""The training step under torch DistributedDataParallel (gloo, 2 CPU processes), without Ray."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from sagan.models import build_models
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
