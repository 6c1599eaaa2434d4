"""Rank, world size and the small collectives the training loops share (a no-op on one process)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if rank_world()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def same_on_all_ranks(t: torch.Tensor) -> bool:
    """Whether `t` agrees on every rank, compared through its sum and a position-weighted sum (float64).

    Two all-reduces of two numbers, whatever the size of `t`: cheap enough to check a queue after a restart.
    """
    if rank_world()[1] == 1:
        return True
    flat = t.detach().flatten().double()
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    low = torch.stack([flat.sum(), (flat * weights).sum()])
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))
