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


class _SubBatchNorm(torch.autograd.Function):
    """Batch norm of `x` viewed as (N/G, G, C, H, W), with statistics per (sub-batch g, channel c).

    A view that only splits the batch dimension exists for every memory format, so the output keeps
    the input's (channels_last stays channels_last) and no layout copy is made. Kernels per call:
    forward one `var_mean` and one `addcmul` (what a fused BN kernel reads and writes); backward two
    reductions and two `addcmul`s. The backward is written out because autograd's own, through
    `var_mean` and the affine op, would take about twice as many passes over the activations.
    Statistics come out in fp32 (for bf16/fp16 inputs `var_mean` accumulates in fp32 and rounds its
    result to the input type, about the precision the input itself carries).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float):
        N, C, H, W = x.shape
        x5 = x.view(N // groups, groups, C, H, W)
        var, mean = torch.var_mean(x5, dim=(0, 3, 4), correction=0)
        mean, var = mean.float(), var.float()
        invstd = torch.rsqrt(var + eps)
        scale = invstd * weight.float()  # (G, C)
        shift = bias.float() - mean * scale
        # The output stays 5-D (laid out like x5): a view made here could not be modified in place
        # afterwards (ReLU(inplace=True) does), so the caller views it back to N x C x H x W.
        y5 = torch.addcmul(_bcast(shift, x), x5, _bcast(scale, x))
        ctx.save_for_backward(x, mean, invstd, weight)
        ctx.groups = groups
        ctx.mark_non_differentiable(mean, var)
        return y5, mean, var

    @staticmethod
    def backward(ctx, dy5: torch.Tensor, _grad_mean, _grad_var):
        x, mean, invstd, weight = ctx.saved_tensors
        N, C, H, W = x.shape
        G = ctx.groups
        x5 = x.view(N // G, G, C, H, W)
        n = N // G * H * W
        sum_dy = dy5.sum(dim=(0, 3, 4), dtype=torch.float32)
        sum_dy_xmu = (dy5 * x5).sum(dim=(0, 3, 4), dtype=torch.float32) - mean * sum_dy
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # dx = a * (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean))), a = weight * invstd,
            # written as a * dy + k * x + c so that two passes produce it
            a = weight.float() * invstd
            k = -a * invstd * invstd * sum_dy_xmu / n
            c = -k * mean - a * sum_dy / n
            grad_x = torch.addcmul(_bcast(c, x), x5, _bcast(k, x)).addcmul_(dy5, _bcast(a, x)).view(N, C, H, W)
        if ctx.needs_input_grad[1]:
            grad_w = (sum_dy_xmu * invstd).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = sum_dy.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


def sub_batch_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode batch norm of sub-batches g = samples g, g+G, ...: (output, mean, biased variance),
    the statistics (G x C, fp32, no gradient) for the caller's running averages. Any memory format."""
    y5, mean, var = _SubBatchNorm.apply(x, weight, bias, groups, eps)
    return y5.view(x.shape), mean, var


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (G, C) coefficient shaped to broadcast over the (N/G, G, C, H, W) view, in `like`'s dtype."""
    return t.to(like.dtype)[None, :, :, None, None]


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises `num_splits` sub-batches independently.

    Sub-batch g holds samples g, g+G, g+2G, ... (a strided split needs no copy). Running statistics are
    the mean of the sub-batches' updates (each sub-batch's variance unbiased over its own N/G*H*W
    values), so evaluation behaves like a plain BN. The output keeps the input's memory format: NCHW
    input goes through one native batch norm on an (N/G, G*C, H, W) view, any other layout
    (channels_last) through `sub_batch_norm`, which needs no layout copy.
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
        n = N // G * H * W
        if n < 2:
            raise ValueError(f"SplitBatchNorm: sub-batches of {N // G} x {H} x {W} = 1 value per channel; "
                             "batch norm needs more than one")
        # BN's own rule: the momentum, or with momentum None a cumulative average (used to recompute statistics)
        momentum = self.momentum if self.momentum is not None else 1.0 / (int(self.num_batches_tracked) + 1)
        if x.is_contiguous():
            return self._forward_reshaped(x, momentum)
        weight = self.weight if self.affine else torch.ones(C, device=x.device)
        bias = self.bias if self.affine else torch.zeros(C, device=x.device)
        out, mean, var = sub_batch_norm(x, weight, bias, G, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean.mean(0), momentum)
                self.running_var.lerp_(var.mean(0) * (n / (n - 1)), momentum)
                self.num_batches_tracked.add_(1)
        return out

    def _forward_reshaped(self, x: torch.Tensor, momentum: float) -> torch.Tensor:
        """NCHW input: (N/G, G*C, H, W) is a view of it, and one native batch norm over G*C channels
        is the fastest kernel there is (on CPU the grouped function's strided reductions are ~2x slower)."""
        G = self.num_splits
        N, C, H, W = x.shape
        track = self.track_running_stats
        mean = self.running_mean.repeat(G) if track else None
        var = self.running_var.repeat(G) if track else None
        out = F.batch_norm(
            x.view(N // G, C * G, H, W), mean, var,
            self.weight.repeat(G) if self.affine else None, self.bias.repeat(G) if self.affine else None,
            True, momentum, self.eps,
        )
        if track:
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
