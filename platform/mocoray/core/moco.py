"""The MoCo model: query encoder, momentum key encoder, key queue, and one training step.

Reading order: `Encoder` (backbone + projection head), `momentum_update`, `MoCo.forward` (the
algorithm), `train_step` (forward, backward, optimiser step, enqueue).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .loss import contrastive_accuracy, info_nce, moco_logits
from .queue import KeyQueue
from .shuffle_bn import BN_MODES, all_gather_batch, convert_to_split_bn, shuffle_batch, unshuffle_batch


def projection_head(in_dim: int, out_dim: int, mlp: bool, bn: bool = False) -> nn.Module:
    """MoCo v1: one linear layer. MoCo v2: a 2-layer MLP with a hidden layer as wide as the input.

    `bn` adds BatchNorm after the hidden layer (SimCLR, MoCo v3). It normalises over the whole batch of a
    worker even under SplitBatchNorm: one shared set of statistics holds no sub-batch identity to exploit.
    """
    if mlp:
        norm = [nn.BatchNorm1d(in_dim)] if bn else []
        return nn.Sequential(nn.Linear(in_dim, in_dim, bias=not bn), *norm, nn.ReLU(inplace=True),
                             nn.Linear(in_dim, out_dim))
    if bn:
        raise ValueError("a BatchNorm head needs the MLP head (mlp=True)")
    return nn.Linear(in_dim, out_dim)


class Encoder(nn.Module):
    """Backbone followed by the projection head. The backbone is what downstream tasks keep."""

    def __init__(self, backbone: nn.Module, feat_dim: int, dim: int, mlp: bool, head_bn: bool = False,
                 head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head if head is not None else projection_head(feat_dim, dim, mlp, head_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """theta_target <- m * theta_target + (1 - m) * theta_online, for every parameter.

    Buffers (BN running statistics) are copied from the online network rather than averaged: the key
    encoder always runs in training mode, so its own running statistics are never used by MoCo, and a
    copy keeps them meaningful for anyone who evaluates the key encoder.
    """
    t_params = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    torch._foreach_mul_(t_params, m)
    torch._foreach_add_(t_params, o_params, alpha=1.0 - m)
    t_bufs, o_bufs = list(target.buffers()), list(online.buffers())
    if len(t_bufs) != len(o_bufs):
        raise ValueError("online and target networks differ in their buffers")
    if t_bufs:
        torch._foreach_copy_(t_bufs, o_bufs)


@dataclass
class MoCoOutput:
    loss: torch.Tensor
    logits: torch.Tensor | None  # v1/v2: [q.k+, q.queue] / tau
    keys: torch.Tensor | None  # v1/v2: the global batch's keys in rank order, what every rank enqueues; v3: None
    accuracy: torch.Tensor | None = None  # v3 (no queue): top-1 of the positive among the global batch's keys


class MoCo(nn.Module):
    """Momentum Contrast (v1/v2 differ only in head, augmentation and temperature).

    bn_mode is one of: shuffle (cross-worker shuffle via all-gather), split (SplitBatchNorm with
    `num_splits` sub-batches and an in-process shuffle of the key batch), sync (SyncBatchNorm, set up by
    the caller), none (no protection). The caller resolves it per world size (`resolve_bn_mode`).
    """

    def __init__(
        self,
        encoder: Encoder,
        queue_size: int,
        momentum: float,
        temperature: float,
        bn_mode: str = "shuffle",
        num_splits: int = 8,
    ) -> None:
        super().__init__()
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode={bn_mode!r} is not one of {', '.join(BN_MODES)}")
        if bn_mode == "split":
            encoder = convert_to_split_bn(encoder, num_splits)
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        dim = self._output_dim(encoder)
        self.queue = KeyQueue(queue_size, dim)
        self.momentum = momentum
        self.temperature = temperature
        self.bn_mode = bn_mode

    @staticmethod
    def _output_dim(encoder: Encoder) -> int:
        last = [m for m in encoder.head.modules() if isinstance(m, nn.Linear)][-1]
        return last.out_features

    @torch.no_grad()
    def encode_keys(self, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys for this rank's images (in their order) and for the global batch (in rank order)."""
        if self.bn_mode == "shuffle":
            shuffled, undo = shuffle_batch(im_k)
            k = F.normalize(self.encoder_k(shuffled), dim=1)
            return unshuffle_batch(k, undo)
        if self.bn_mode == "split":
            # SplitBatchNorm groups samples g, g+G, ...; shuffle so those groups are random subsets.
            perm = torch.randperm(im_k.shape[0], device=im_k.device)
            k = F.normalize(self.encoder_k(im_k[perm]), dim=1)[torch.argsort(perm)]
        else:
            k = F.normalize(self.encoder_k(im_k), dim=1)
        return k, all_gather_batch(k)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> MoCoOutput:
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            momentum_update(self.encoder_q, self.encoder_k, self.momentum)
            k, k_global = self.encode_keys(im_k)
        # The queue is read here and written only after backward (see train_step), so no clone.
        logits = moco_logits(q, k, self.queue.keys, self.temperature)
        return MoCoOutput(loss=info_nce(logits), logits=logits, keys=k_global)


class NonFiniteLossError(RuntimeError):
    """Raised on every rank at once when any rank's loss is NaN or infinite."""


def count_nonfinite_ranks(loss: torch.Tensor) -> torch.Tensor:
    """Number of ranks whose loss is NaN or infinite (a 0-d tensor; one tiny all-reduce)."""
    bad = (~torch.isfinite(loss.detach())).float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad)
    return bad


@dataclass
class StepResult:
    loss: float
    accuracy: float


def unwrap(model: nn.Module) -> MoCo:
    """The MoCo module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


def train_step(
    model: nn.Module,
    im_q: torch.Tensor,
    im_k: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    clip_grad_norm: float | None = None,
) -> StepResult:
    """One MoCo step. `model` is a MoCo or MoCoV3, possibly wrapped in DDP (which then syncs query gradients).

    The keys are enqueued after the optimiser step, so the logits of this step saw the queue as it was (v3
    has no queue).
    """
    amp = torch.autocast(im_q.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with amp:
        out: MoCoOutput = model(im_q, im_k)
    # One host sync per step for all three numbers: on a GPU every .item() stalls the pipeline.
    bad, loss, acc = torch.stack(
        [count_nonfinite_ranks(out.loss), out.loss.detach().float(),
         out.accuracy if out.accuracy is not None else contrastive_accuracy(out.logits)]
    ).tolist()
    if bad:  # every rank sees the same count, so all stop at this step together
        raise NonFiniteLossError(f"loss is {loss} (non-finite) on {int(bad)} rank(s); stopping before it "
                                 "reaches the weights")
    optimizer.zero_grad(set_to_none=True)
    # Everything that trains: encoder_q for v1/v2, encoder_q and the predictor for v3.
    trainable = [p for p in unwrap(model).parameters() if p.requires_grad]
    if scaler is not None and scaler.is_enabled():
        scaler.scale(out.loss).backward()
        if clip_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        out.loss.backward()
        if clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, clip_grad_norm)
        optimizer.step()
    if out.keys is not None:
        unwrap(model).queue.enqueue(out.keys)
    return StepResult(loss=loss, accuracy=acc)
