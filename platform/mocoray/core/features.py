"""Frozen-backbone features of a whole dataset, each rank computing a strided share (then all-gathered)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .augment import normalize_batch
from .distributed import rank_world


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Rank `rank`'s strided share of range(n), padded (with the last index) to the same length on every rank."""
    per_rank = math.ceil(n / world)
    return [min(i, n - 1) for i in range(rank, per_rank * world, world)]


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    n: int,
    batches_of: Callable[[list[int]], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    device: torch.device,
    image_size: int,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of items 0..n-1 in order, the same full (n x D, n) tensors on every rank.

    `batches_of(indices)` yields (images, labels) batches of those items (uint8 or float images). The
    backbone runs in eval mode.
    """
    rank, world = rank_world()
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for images, y in batches_of(shard_indices(n, rank, world)):
        x = normalize_batch(images.to(device, non_blocking=True), size=image_size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats.append(backbone(x).float())
        labels.append(y.to(device))
    backbone.train(was_training)
    f, y = torch.cat(feats), torch.cat(labels)
    if world > 1:
        fs = [torch.empty_like(f) for _ in range(world)]
        ys = [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(fs, f)
        dist.all_gather(ys, y)
        # element j of rank r is item r + j * world: interleave back to dataset order
        f = torch.stack(fs, dim=1).reshape(-1, f.shape[1])[:n]
        y = torch.stack(ys, dim=1).reshape(-1)[:n]
    return f, y
