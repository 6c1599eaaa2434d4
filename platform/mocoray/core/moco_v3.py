"""MoCo v3 (Chen, Xie, He 2021): BN MLP heads, a predictor on the query side, and a symmetric InfoNCE over
the keys of the whole global batch; no queue.

Reading order: `_GlobalBatchNorm` (BN synchronised across workers: the heads', and a ResNet's), `mlp`, `MoCoV3.forward`
(the algorithm), `symmetric_loss`.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from .distributed import rank_world
from .loss import full_precision
from .moco import Encoder, MoCoOutput, momentum_update
from .shuffle_bn import all_gather_batch


class _GlobalBatchNorm:
    """Batch norm whose training statistics are those of the global batch (all workers), like SyncBatchNorm.

    torch's SyncBatchNorm refuses CPU tensors, so v3 uses this instead on every device: per-channel sum, sum of
    squares and count are summed over ranks by a differentiable all-reduce (gradients flow back through the
    global mean and variance, as in SyncBatchNorm). On one process it is the plain BatchNorm it extends.
    Statistics are over every dimension but the channels (dim 1): (N, C) for the heads, (N, C, H, W) for a
    ResNet's layers.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, world = rank_world()
        if not self.training or world == 1:
            return super().forward(x)  # type: ignore[misc]
        c = self.num_features
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)  # broadcasts a per-channel vector over x
        with full_precision(x.device.type):
            xf = x.float()
            count = float(xf.numel() // c)
            local = torch.cat([xf.sum(dims), (xf * xf).sum(dims), xf.new_tensor([count])])
            total = dist_fn.all_reduce(local)
            n = total[-1]
            mean = total[:c] / n
            var = (total[c:2 * c] / n - mean * mean).clamp_min(0.0)
            out = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
            if self.affine:
                out = out * self.weight.view(shape) + self.bias.view(shape)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            unbiased = var.detach() * n / (n - 1).clamp_min(1.0)
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        return out.to(x.dtype)


class GlobalBatchNorm1d(_GlobalBatchNorm, nn.BatchNorm1d):
    """The heads' BN: BatchNorm1d over the global batch."""


class GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    """A ResNet backbone's BN under v3 (`moco.backbone_bn: global`): BatchNorm2d over the global batch."""


def global_backbone_bn(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm2d replaced by a GlobalBatchNorm2d holding the same parameters and statistics
    (the paper converts the whole model to SyncBN). State-dict keys are unchanged, so checkpoints, export and the
    downstream jobs, which build plain BatchNorm2d, read it as before. A ViT has no BatchNorm2d: unchanged."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            bn = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            global_backbone_bn(child)
    return module


def mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's heads: Linear-BN-ReLU blocks, then a Linear to `out_dim` followed (`last_bn`) by a BN without
    affine parameters. Linear layers before a BN have no bias (the BN's shift replaces it)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        dim_in = in_dim if i == 0 else hidden_dim
        if i < num_layers - 1:
            layers += [nn.Linear(dim_in, hidden_dim, bias=False), GlobalBatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        else:
            layers.append(nn.Linear(dim_in, out_dim, bias=not last_bn))
            if last_bn:
                layers.append(GlobalBatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def contrastive_loss(q: torch.Tensor, k_global: torch.Tensor, temperature: float, rank: int) -> tuple[torch.Tensor,
                                                                                                      torch.Tensor]:
    """InfoNCE of this rank's queries against every rank's keys (rank order), scaled by 2 tau as in the paper;
    the positive of query i is key i + N * rank. Returns the loss and the top-1 accuracy (in float32)."""
    with full_precision(q.device.type):
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k_global.float(), dim=1)
        logits = q @ k.t() / temperature
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
        loss = F.cross_entropy(logits, labels) * (2 * temperature)
        acc = (logits.argmax(dim=1) == labels).float().mean()
    return loss, acc.detach()


class MoCoV3(nn.Module):
    """Query: backbone + projection MLP + prediction MLP; key: a momentum copy of backbone + projection MLP.

    `encoder_q` and `encoder_k` are `Encoder`s (backbone + `head` = projection MLP) like v1/v2's, so the
    momentum update, the kNN monitor, checkpoints and export treat both versions alike; the predictor sits
    beside `encoder_q` and has no key-side twin.
    """

    def __init__(self, encoder: Encoder, predictor: nn.Module, momentum: float, temperature: float) -> None:
        super().__init__()
        self.encoder_q = encoder
        self.predictor = predictor
        self.encoder_k = copy.deepcopy(encoder)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.momentum = momentum
        self.temperature = temperature

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> MoCoOutput:
        q1 = self.predictor(self.encoder_q(x1))
        q2 = self.predictor(self.encoder_q(x2))
        with torch.no_grad():
            momentum_update(self.encoder_q, self.encoder_k, self.momentum)
            k1 = all_gather_batch(self.encoder_k(x1))
            k2 = all_gather_batch(self.encoder_k(x2))
        loss, acc = symmetric_loss(q1, q2, k1, k2, self.temperature)
        return MoCoOutput(loss=loss, logits=None, keys=None, accuracy=acc)


def symmetric_loss(q1: torch.Tensor, q2: torch.Tensor, k1_global: torch.Tensor, k2_global: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ctr(q1, k2) + ctr(q2, k1): each view's queries against the other view's keys; accuracy is their mean."""
    rank, _ = rank_world()
    l12, a12 = contrastive_loss(q1, k2_global, temperature, rank)
    l21, a21 = contrastive_loss(q2, k1_global, temperature, rank)
    return l12 + l21, (a12 + a21) / 2


def build_moco_v3(backbone: nn.Module, feat_dim: int, dim: int, hidden_dim: int, proj_layers: int,
                  momentum: float, temperature: float) -> MoCoV3:
    """The paper's heads: a `proj_layers`-layer projection MLP (3 for ViT, 2 for ResNet) and a 2-layer predictor."""
    encoder = Encoder(backbone, feat_dim, dim, mlp=True, head=mlp(proj_layers, feat_dim, hidden_dim, dim))
    return MoCoV3(encoder, mlp(2, dim, hidden_dim, dim), momentum, temperature)


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups for AdamW / SGD: weight decay on weight matrices and kernels only, none on biases and
    norm parameters (1-d tensors), as MoCo v3 and most ViT recipes do. Frozen parameters are left out."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
