import torch
from torch import nn

from mocoray.core.moco import Encoder, MoCo, momentum_update


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_momentum_update_follows_the_formula_for_every_parameter():
    torch.manual_seed(0)
    online, target = _net(), _net()
    before_t = [p.detach().clone() for p in target.parameters()]
    before_o = [p.detach().clone() for p in online.parameters()]
    momentum_update(online, target, m=0.9)
    for t, bt, bo in zip(target.parameters(), before_t, before_o, strict=True):
        assert torch.allclose(t, 0.9 * bt + 0.1 * bo)
    # hand-computed on one scalar: 0.9 * 2 + 0.1 * 12 = 3.0
    a, b = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    a.weight.data.fill_(12.0)
    b.weight.data.fill_(2.0)
    momentum_update(a, b, 0.9)
    assert b.weight.item() == 3.0


def test_momentum_update_copies_buffers_and_leaves_online_untouched():
    online, target = _net(), _net()
    online[1].running_mean.fill_(5.0)
    snapshot = [p.detach().clone() for p in online.parameters()]
    momentum_update(online, target, 0.99)
    assert torch.equal(target[1].running_mean, online[1].running_mean)
    assert all(torch.equal(a, b) for a, b in zip(online.parameters(), snapshot, strict=True))


def test_key_encoder_starts_as_a_copy_and_gets_no_gradients():
    enc = Encoder(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 4, 8, True)
    m = MoCo(enc, queue_size=16, momentum=0.99, temperature=0.2, bn_mode="none")
    for q, k in zip(m.encoder_q.state_dict().values(), m.encoder_k.state_dict().values(), strict=True):
        assert torch.equal(q, k)
    assert all(not p.requires_grad for p in m.encoder_k.parameters())
    assert m.encoder_q is not m.encoder_k
