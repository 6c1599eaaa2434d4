import torch
from torch import nn

from mocoray.core.shuffle_bn import SplitBatchNorm, convert_to_split_bn, resolve_bn_mode


def test_split_batch_norm_equals_plain_bn_on_each_sub_batch():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 4, 4) * 3 + 1
    split = SplitBatchNorm(3, num_splits=3)
    split.weight.data = torch.tensor([1.0, 2.0, 0.5])
    split.bias.data = torch.tensor([0.0, -1.0, 3.0])
    out = split(x)
    ref_mean, ref_var = torch.zeros(3), torch.zeros(3)
    for g in range(3):
        bn = nn.BatchNorm2d(3)
        bn.load_state_dict({k: v for k, v in split.state_dict().items() if k != "num_batches_tracked"}, strict=False)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        sub = x[g::3]  # sub-batch g holds samples g, g+G, ...
        assert torch.allclose(out[g::3], bn(sub), atol=1e-5)
        ref_mean += bn.running_mean / 3
        ref_var += bn.running_var / 3
    assert torch.allclose(split.running_mean, ref_mean, atol=1e-6)
    assert torch.allclose(split.running_var, ref_var, atol=1e-6)


def test_split_batch_norm_differs_from_full_batch_bn_and_evaluates_like_bn():
    torch.manual_seed(1)
    x = torch.randn(8, 2, 3, 3)
    x[::2] += 5  # sub-batch 0 (even samples) has a different mean
    split, bn = SplitBatchNorm(2, 2), nn.BatchNorm2d(2)
    assert not torch.allclose(split(x), bn(x), atol=1e-3)
    split.eval()
    bn.eval()
    bn.load_state_dict(split.state_dict())
    assert torch.allclose(split(x), bn(x))


def test_convert_replaces_every_bn_and_keeps_weights():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    net[1].weight.data.fill_(7.0)
    convert_to_split_bn(net, 4)
    assert isinstance(net[1], SplitBatchNorm) and isinstance(net[2][0], SplitBatchNorm)
    assert torch.all(net[1].weight == 7.0)


def test_bn_mode_resolution_is_explicit():
    assert resolve_bn_mode("shuffle", 1, "cpu") == "split"
    assert resolve_bn_mode("shuffle", 2, "cpu") == "shuffle"
    assert resolve_bn_mode("none", 2, "cpu") == "none"
    import pytest

    with pytest.raises(ValueError, match="sync"):
        resolve_bn_mode("sync", 2, "cpu")
    with pytest.raises(ValueError, match="one of"):
        resolve_bn_mode("shufle", 2, "cpu")
