"""Ways to stop batch norm from leaking which key matches which query.

With plain BN the key and query of a pair are normalised with statistics of the same sub-batch, and
the network can cheat by exploiting that. MoCo's fix is *shuffle BN*: the key encoder sees the global
batch in a different random order, so each worker's BN statistics come from a random subset of keys.

Here the shuffle is built from all-gathers (works on gloo and NCCL): gather the key batch, permute it
with one permutation shared by all ranks (drawn on rank 0 and broadcast), let every rank encode its
own slice, then gather the keys and apply the inverse permutation. On a single process the same effect
comes from `SplitBatchNorm`, which normalises G sub-batches separately.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .distributed import rank_world

BN_MODES = ("shuffle", "split", "sync", "none")


@torch.no_grad()
def all_gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` (same shape on all ranks) along dim 0, in rank order. No gradient."""
    _, world = rank_world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def shared_permutation(n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A permutation of range(n), identical on every rank: drawn on rank 0, then broadcast."""
    rank, world = rank_world()
    if rank == 0:
        perm = torch.randperm(n, generator=generator, device="cpu").to(device)
    else:
        perm = torch.empty(n, dtype=torch.long, device=device)
    if world > 1:
        dist.broadcast(perm, src=0)
    return perm


@torch.no_grad()
def shuffle_batch(
    x: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return this rank's slice of the randomly permuted global batch and the index that undoes it.

    Every rank must pass a batch of the same size (drop_last in the sampler guarantees it).
    """
    rank, world = rank_world()
    x_all = all_gather_batch(x)
    perm = shared_permutation(x_all.shape[0], x.device, generator)
    mine = perm.view(world, -1)[rank]
    return x_all[mine], torch.argsort(perm)


@torch.no_grad()
def unshuffle_batch(x_local: torch.Tensor, unshuffle_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `shuffle_batch` on its output: (this rank's rows in original order, all rows in order).

    The global rows come back too because they are exactly what every rank enqueues; returning them
    saves a second all-gather.
    """
    rank, world = rank_world()
    x_all = all_gather_batch(x_local)[unshuffle_index]
    return x_all.view(world, -1, *x_all.shape[1:])[rank], x_all


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises `num_splits` sub-batches independently.

    Sub-batch g holds samples g, g+G, g+2G, ... (a strided split needs no copy). Running statistics are
    the mean of the sub-batches' updates, so evaluation behaves like a plain BN.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G = self.num_splits
        if not self.training or G == 1:
            return super().forward(x)
        N, C, H, W = x.shape
        if N % G:
            raise ValueError(f"SplitBatchNorm: batch of {N} does not split into {G} equal sub-batches")
        mean = self.running_mean.repeat(G)
        var = self.running_var.repeat(G)
        out = F.batch_norm(
            x.reshape(N // G, C * G, H, W),
            mean,
            var,
            self.weight.repeat(G) if self.affine else None,
            self.bias.repeat(G) if self.affine else None,
            True,
            self.momentum if self.momentum is not None else 0.1,
            self.eps,
        )
        with torch.no_grad():
            self.running_mean.copy_(mean.view(G, C).mean(0))
            self.running_var.copy_(var.view(G, C).mean(0))
            self.num_batches_tracked.add_(1)
        return out.view(N, C, H, W)


def convert_to_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in `module` by a SplitBatchNorm carrying the same weights and stats."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SplitBatchNorm):
        split = SplitBatchNorm(
            module.num_features, num_splits, eps=module.eps, momentum=module.momentum, affine=module.affine
        )
        split.load_state_dict(module.state_dict())
        return split.to(next(iter(module.buffers())).device)
    for name, child in module.named_children():
        setattr(module, name, convert_to_split_bn(child, num_splits))
    return module


def resolve_bn_mode(requested: str, world_size: int, device_type: str) -> str:
    """The BN-leak handling that will actually run; explicit, so it can be logged and never skipped.

    `shuffle` needs more than one worker to mean anything: with one worker it becomes `split`.
    `sync` (SyncBatchNorm) only runs on accelerators in PyTorch.
    """
    if requested not in BN_MODES:
        raise ValueError(f"moco.bn_mode={requested!r} is not one of {', '.join(BN_MODES)}")
    if requested == "shuffle" and world_size == 1:
        return "split"
    if requested == "sync" and device_type == "cpu":
        raise ValueError(
            "moco.bn_mode='sync' needs GPUs (torch's SyncBatchNorm has no CPU kernel); "
            "use 'shuffle' or 'split' on CPU"
        )
    return requested
