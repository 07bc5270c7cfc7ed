"""Checks that the DDP ranks agree: on the values they stop on, and on their weights."""

import torch

from sagan.step import unwrap


def param_spread(G, D) -> float:
    """Max minus min over ranks of a checksum of G's and D's weights: 0 while DDP keeps ranks in step."""
    total = sum(p.detach().double().sum() for p in [*unwrap(G).parameters(), *unwrap(D).parameters()])
    local = total.reshape(1)  # on the model's device: NCCL gathers GPU tensors only
    if not torch.distributed.is_initialized():
        return 0.0
    gathered = [torch.zeros_like(local) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, local)
    values = torch.cat(gathered)
    return float(values.max() - values.min())


def agree(values: dict[str, float], bad_step: int | None, device) -> tuple[dict[str, float], int | None]:
    """The losses averaged over ranks, and the first non-finite step on any rank: every rank then takes the
    same decision (go on, or stop), and none is left waiting in a collective for a rank that stopped."""
    if not torch.distributed.is_initialized() or not values:
        return values, bad_step
    mean = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    first_bad = torch.tensor([float("inf") if bad_step is None else bad_step], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(mean)
    torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
    mean = (mean / torch.distributed.get_world_size()).tolist()
    first = first_bad.item()
    return dict(zip(values, mean)), (None if first == float("inf") else int(first))
