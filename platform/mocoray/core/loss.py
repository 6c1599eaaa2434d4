"""InfoNCE over one positive key and a queue of negatives, and its top-1 accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def full_precision(device_type: str) -> torch.autocast:
    """Autocast switched off: inside autocast, `.float()` inputs alone do not keep a matmul in float32."""
    return torch.autocast(device_type, enabled=False)


def moco_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits N x (1+K): column 0 is q.k+ (the positive), columns 1.. are q.queue (the negatives).

    Computed in float32 whatever the autocast dtype: with tau ~0.07 a bf16 logit is off by ~0.02.
    """
    with full_precision(q.device.type):
        q, k, queue = q.float(), k.float(), queue.float()
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = q @ queue.t()
        return torch.cat([l_pos, l_neg], dim=1) / temperature


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the positive at index 0 for every row (in float32, like the logits)."""
    with full_precision(logits.device.type):
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def contrastive_accuracy(logits: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose positive logit beats every negative (instance discrimination top-1).

    Strictly greater: a collapsed encoder gives all-equal logits, which argmax would count as a hit.
    """
    return (logits[:, 0] > logits[:, 1:].max(dim=1).values).float().mean()
