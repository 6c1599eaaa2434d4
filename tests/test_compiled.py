"""Compiled encoders give the eager MoCo step's results; the optimiser choice per device."""

import pytest
import torch
from torch import nn

from mocoray.core.compiled import compile_encoders, make_sgd
from mocoray.core.moco import Encoder, MoCo, train_step


def _tiny_moco() -> MoCo:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                             nn.Conv2d(8, 16, 3, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return MoCo(Encoder(backbone, 16, 8, mlp=True), queue_size=32, momentum=0.9, temperature=0.2,
                bn_mode="split", num_splits=2)


def test_compiled_encoders_give_the_eager_steps_losses_weights_and_queue():
    # backend aot_eager: the same graph capture and autograd tracing as inductor, without generating
    # C++ kernels (minutes on this CPU); tests/test_gpu.py runs inductor on a GPU. channels_last, so
    # that split BN takes its grouped autograd function, which dynamo must trace without a break.
    fmt = torch.channels_last
    eager, compiled = _tiny_moco().to(memory_format=fmt), _tiny_moco().to(memory_format=fmt)
    compile_encoders(compiled, backend="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys
    opts = [make_sgd(m.encoder_q.parameters(), 0.1, 0.9, 1e-4, "cpu") for m in (eager, compiled)]
    torch.manual_seed(1)
    x = torch.randn(8, 3, 12, 12).contiguous(memory_format=fmt)
    for step in range(3):
        results = []
        for model, opt in zip((eager, compiled), opts, strict=True):
            torch.manual_seed(100 + step)  # the same key shuffle for both
            results.append(train_step(model, x, x.flip(-1).contiguous(memory_format=fmt), opt))
        assert results[0].loss == pytest.approx(results[1].loss, abs=1e-5)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_sgd_uses_multi_tensor_kernels_off_cuda():
    p = [nn.Parameter(torch.ones(3))]
    opt = make_sgd(p, 0.1, 0.9, 0.0, "cpu")
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
