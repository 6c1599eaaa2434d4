import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mocoray.core.shuffle_bn import SplitBatchNorm, convert_to_split_bn, resolve_bn_mode, sub_batch_norm


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
    with pytest.raises(ValueError, match="sync"):
        resolve_bn_mode("sync", 2, "cpu")
    with pytest.raises(ValueError, match="one of"):
        resolve_bn_mode("shufle", 2, "cpu")


class ReferenceSplitBatchNorm(nn.BatchNorm2d):
    """The original algorithm, kept as the reference: the batch reshaped to (N/G, C*G, H, W), one
    plain batch norm over G*C channels, running statistics averaged over the G copies."""

    def __init__(self, num_features: int, num_splits: int) -> None:
        super().__init__(num_features)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G = self.num_splits
        N, C, H, W = x.shape
        mean, var = self.running_mean.repeat(G), self.running_var.repeat(G)
        out = F.batch_norm(x.reshape(N // G, C * G, H, W), mean, var, self.weight.repeat(G), self.bias.repeat(G),
                           True, self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(G, C).mean(0))
            self.running_var.copy_(var.view(G, C).mean(0))
        return out.view(N, C, H, W)


def _pair(C: int, G: int) -> tuple[SplitBatchNorm, ReferenceSplitBatchNorm]:
    new, ref = SplitBatchNorm(C, G), ReferenceSplitBatchNorm(C, G)
    with torch.no_grad():
        for m in (new, ref):
            m.weight.copy_(torch.linspace(0.5, 2.0, C))
            m.bias.copy_(torch.linspace(-1.0, 1.0, C))
            m.running_mean.copy_(torch.linspace(-0.3, 0.3, C))
            m.running_var.copy_(torch.linspace(0.5, 1.5, C))
    return new, ref


def _run(bn: nn.Module, x: torch.Tensor, dy: torch.Tensor, amp: bool):
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = bn(x)
        (out.float() * dy).sum().backward()
    return out, x.grad, bn.weight.grad, bn.bias.grad


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_bn_matches_reshape_reference_in_outputs_gradients_and_running_stats(channels_last):
    torch.manual_seed(0)
    N, C, H, W, G = 16, 6, 5, 7, 4
    new, ref = _pair(C, G)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(3):  # running statistics accumulate over several updates
        x = (torch.randn(N, C, H, W) * torch.linspace(0.5, 3, C).view(1, C, 1, 1) + step).contiguous(memory_format=fmt)
        dy = torch.randn(N, C, H, W)
        new.zero_grad()
        ref.zero_grad()
        out, gx, gw, gb = _run(new, x, dy, amp=False)
        r_out, r_gx, r_gw, r_gb = _run(ref, x, dy, amp=False)
        assert out.is_contiguous(memory_format=fmt)
        assert torch.allclose(out, r_out, atol=1e-5)
        assert torch.allclose(gx, r_gx, atol=1e-5)
        assert torch.allclose(gw, r_gw, atol=1e-4) and torch.allclose(gb, r_gb, atol=1e-4)
        assert torch.allclose(new.running_mean, ref.running_mean, atol=1e-6)
        assert torch.allclose(new.running_var, ref.running_var, atol=1e-6)
    assert int(new.num_batches_tracked) == 3


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_bn_under_bf16_autocast_matches_reference_within_bf16_precision(channels_last):
    torch.manual_seed(1)
    N, C, H, W, G = 32, 8, 6, 6, 8
    new, ref = _pair(C, G)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(N, C, H, W) * 2 + 0.5).bfloat16().contiguous(memory_format=fmt)  # as a conv under autocast
    dy = torch.randn(N, C, H, W)
    out, gx, gw, gb = _run(new, x, dy, amp=True)
    r_out, r_gx, r_gw, r_gb = _run(ref, x, dy, amp=True)
    assert out.dtype == r_out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=fmt)
    # bf16 keeps 8 significant bits (relative 2^-9 = 0.002): compare with a few of its steps
    assert torch.allclose(out.float(), r_out.float(), atol=0.03, rtol=0.01)
    assert torch.allclose(gx.float(), r_gx.float(), atol=0.03, rtol=0.02)
    assert torch.allclose(gw, r_gw, rtol=0.02, atol=0.05) and torch.allclose(gb, r_gb, rtol=0.01, atol=0.05)
    assert torch.allclose(new.running_mean, ref.running_mean, atol=2e-3)
    assert torch.allclose(new.running_var, ref.running_var, rtol=5e-3)


def test_sub_batch_norm_function_matches_reference_on_nchw_input_too():
    # the module sends NCHW input to the native kernel; the grouped function must be right there as well
    torch.manual_seed(2)
    N, C, H, W, G = 12, 5, 4, 3, 3
    x = (torch.randn(N, C, H, W) * 2 - 1).requires_grad_(True)
    w = torch.linspace(0.5, 2.0, C).requires_grad_(True)
    b = torch.linspace(-1.0, 1.0, C).requires_grad_(True)
    dy = torch.randn(N, C, H, W)
    out, mean, var = sub_batch_norm(x, w, b, G, 1e-5)
    (out * dy).sum().backward()
    ref = ReferenceSplitBatchNorm(C, G)
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(b)
    r_out, r_gx, r_gw, r_gb = _run(ref, x, dy, amp=False)
    assert torch.allclose(out, r_out, atol=1e-5) and torch.allclose(x.grad, r_gx, atol=1e-5)
    assert torch.allclose(w.grad, r_gw, atol=1e-4) and torch.allclose(b.grad, r_gb, atol=1e-4)
    for g in range(G):
        sub = x.detach()[g::G]
        assert torch.allclose(mean[g], sub.mean(dim=(0, 2, 3)), atol=1e-6)
        assert torch.allclose(var[g], sub.var(dim=(0, 2, 3), correction=0), atol=1e-5)
