import math

import torch

from mocoray.core.loss import contrastive_accuracy, info_nce, moco_logits


def test_logits_put_the_positive_first_and_divide_by_temperature():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    logits = moco_logits(q, k, queue, temperature=0.5)
    expected = torch.tensor([[1.0, 0.0, -1.0, 0.6], [0.0, 1.0, 0.0, 0.8]]) / 0.5
    assert torch.allclose(logits, expected)


def test_info_nce_matches_an_explicit_log_softmax():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    k = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    tau = 0.07
    loss = info_nce(moco_logits(q, k, queue, tau))
    manual = 0.0
    for i in range(4):
        pos = math.exp(float(q[i] @ k[i]) / tau)
        neg = sum(math.exp(float(q[i] @ queue[j]) / tau) for j in range(16))
        manual += -math.log(pos / (pos + neg))
    assert abs(loss.item() - manual / 4) < 1e-4


def test_contrastive_accuracy_counts_rows_where_the_positive_wins():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [2.0, 2.5, 1.0], [9.0, 0.0, 0.0]])
    assert contrastive_accuracy(logits).item() == 0.5
    # ties are misses: a collapsed encoder (all logits equal) scores 0, not 1
    assert contrastive_accuracy(torch.ones(4, 5)).item() == 0.0


def test_logits_are_float32_under_low_precision_inputs():
    q = torch.randn(2, 4).bfloat16()
    assert moco_logits(q, q, torch.randn(3, 4).bfloat16(), 0.2).dtype == torch.float32


def test_logits_and_loss_under_bf16_autocast_match_a_float64_reference():
    # K 4096, tau 0.07: a bf16 matmul inside autocast is off by ~0.02 in the logits
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(64, 128), dim=1)
    k = torch.nn.functional.normalize(torch.randn(64, 128), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(4096, 128), dim=1)
    ref_logits = moco_logits(q.double(), k.double(), queue.double(), 0.07)
    ref_loss = info_nce(ref_logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = moco_logits(q, k, queue, 0.07)
        loss = info_nce(logits)
    assert logits.dtype == loss.dtype == torch.float32
    assert (logits.double() - ref_logits).abs().max().item() < 1e-4
    assert abs(loss.item() - ref_loss.item()) < 1e-5
