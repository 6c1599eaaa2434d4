import math

import torch

from mocoray.core.knn import knn_predict, knn_top1


def test_weighted_votes_match_a_hand_computation():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(query, bank, labels, num_classes=2, k=2, temperature=0.5)
    # two nearest: sim 1.0 (class 0) and 0.8 (class 1)
    assert torch.allclose(scores, torch.tensor([[math.exp(2.0), math.exp(1.6)]]))
    # with k=3 class 1 gets e^{0}/... added: 0.8 and 0.0 vs 1.0
    scores3 = knn_predict(query, bank, labels, 2, k=3, temperature=0.5)
    assert torch.allclose(scores3, torch.tensor([[math.exp(2.0), math.exp(1.6) + math.exp(0.0)]]))


def test_knn_top1_on_two_separable_clusters():
    torch.manual_seed(0)
    a = torch.randn(20, 4) * 0.1 + torch.tensor([5.0, 0, 0, 0])
    b = torch.randn(20, 4) * 0.1 + torch.tensor([0, 5.0, 0, 0])
    feats = torch.cat([a, b])
    labels = torch.tensor([0] * 20 + [1] * 20)
    assert knn_top1(feats[::2], labels[::2], feats[1::2], labels[1::2], k=5) == 1.0
    flipped = 1 - labels[1::2]
    assert knn_top1(feats[::2], labels[::2], feats[1::2], flipped, k=5) == 0.0
