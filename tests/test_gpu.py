"""GPU-only paths: AMP (bf16/fp16 + GradScaler), channels_last, NCCL collectives, SyncBatchNorm.

Skipped without CUDA (CI has none); run on a GPU machine with `python -m pytest tests/test_gpu.py`.
Imports only torch and mocoray.core, so it also runs where Ray and MLflow are not installed.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist

from mocoray.core.augment import BatchAugment, moco_spec
from mocoray.core.backbones import build_backbone
from mocoray.core.moco import Encoder, MoCo, train_step
from mocoray.core.shuffle_bn import all_gather_batch, shuffle_batch, unshuffle_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _moco(arch="resnet18", bn_mode="split", K=256):
    torch.manual_seed(0)
    bb, d = build_backbone(arch, cifar_stem=True)
    return MoCo(Encoder(bb, d, 128, True), K, 0.99, 0.2, bn_mode, num_splits=4).cuda()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_channels_last_steps_are_finite_and_learn(amp):
    m = _moco().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.encoder_q.parameters(), lr=0.03, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    aug = BatchAugment(moco_spec("v2", 32))
    torch.manual_seed(1)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    losses = []
    for _ in range(30):
        q, k = aug.two_views(x)
        q, k = q.contiguous(memory_format=torch.channels_last), k.contiguous(memory_format=torch.channels_last)
        losses.append(train_step(m, q, k, opt, scaler, dtype).loss)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert m.queue.keys.dtype == torch.float32 and m.queue.keys.is_cuda
    assert sum(losses[-5:]) < sum(losses[:5])  # same 64 images over and over: must fit them


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nccl_group():
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    yield
    dist.destroy_process_group()


def test_nccl_shuffle_roundtrip_and_gather_on_cuda(nccl_group):
    x = torch.arange(16, dtype=torch.float32, device="cuda").unsqueeze(1).repeat(1, 4)
    shuffled, undo = shuffle_batch(x)
    assert shuffled.is_cuda and not torch.equal(shuffled, x)
    local, glob = unshuffle_batch(shuffled, undo)
    assert torch.equal(local, x) and torch.equal(glob, x)
    assert torch.equal(all_gather_batch(x), x)


def test_sync_batchnorm_mode_runs_under_nccl(nccl_group):
    m = torch.nn.SyncBatchNorm.convert_sync_batchnorm(_moco(bn_mode="sync"))
    opt = torch.optim.SGD(m.encoder_q.parameters(), lr=0.03)
    x = torch.randn(32, 3, 32, 32, device="cuda")
    res = train_step(m, x, x.flip(-1), opt, None, torch.bfloat16)
    assert res.loss > 0 and int(m.queue.ptr) == 32
