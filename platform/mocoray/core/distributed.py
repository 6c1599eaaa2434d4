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
