"""BatchNorm running statistics: one set across ranks, and recomputed from images for a random-init encoder."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .distributed import rank_world


def _batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def average_bn_statistics(module: nn.Module) -> None:
    """Replace every BN layer's running mean and variance by their average over all ranks (one all-reduce).

    With DDP's per-step buffer broadcast off, each rank's running statistics follow its own shard of the
    data. They are exponential moving averages, which are linear: the average of the ranks' running means
    is the running mean of the global batches' means, what one process over all the data would track. The
    variances average the per-rank ones (the spread between ranks' means is not in it, as in timm's
    `distribute_bn`). `num_batches_tracked` is the same on every rank and stays as it is.
    """
    _, world = rank_world()
    if world == 1:
        return
    stats = [t for bn in _batch_norms(module) for t in (bn.running_mean, bn.running_var)]
    if not stats:
        return
    flat = torch.cat([t.reshape(-1).float() for t in stats])
    dist.all_reduce(flat)
    flat /= world
    for t, avg in zip(stats, torch.split(flat, [t.numel() for t in stats]), strict=True):
        t.copy_(avg.view_as(t))


@torch.no_grad()
def recompute_bn_statistics(module: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Running statistics of every BN layer recomputed from `batches` (model inputs), in training-mode forwards.

    Each layer's running mean becomes the average of the batches' means and its running variance the average
    of their unbiased variances (BN's cumulative average, momentum None). A random-init encoder needs this
    before it is evaluated: at their init values (mean 0, variance 1) the statistics do not normalise, the
    activations grow or vanish layer by layer, and the features it yields in eval mode are degenerate.
    Weights are not touched; the module's training mode and BN momenta are restored afterwards.
    """
    norms = _batch_norms(module)
    was_training, momenta = module.training, [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    module.train()
    for x in batches:
        module(x)
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
    module.train(was_training)
