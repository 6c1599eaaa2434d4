"""Weighted kNN classifier on frozen features: the online monitor of representation quality.

Each query votes with its k most cosine-similar labelled features, weight exp(similarity / T)
(as in Wu et al. 2018, the monitor most MoCo reproductions use).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (N x num_classes) for L2-normalised `query` against the normalised `bank`."""
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, query.shape[0], chunk):
        sim = query[start : start + chunk] @ bank.t()
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=query.device, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_top1(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.1,
) -> float:
    """Top-1 accuracy of the weighted kNN; features are normalised here."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(
        F.normalize(test_feats.float(), dim=1),
        F.normalize(train_feats.float(), dim=1),
        train_labels,
        num_classes,
        k,
        temperature,
    )
    return (scores.argmax(dim=1) == test_labels).float().mean().item()
