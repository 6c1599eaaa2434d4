"""GPU-only paths: AMP (bf16/fp16 + GradScaler), channels_last, NCCL collectives, SyncBatchNorm (MoCo's
bn_mode sync, and the detector's model.norm syncbn across two ranks), split BN in channels_last, compiled
encoders (inductor), fused SGD, nvJPEG decoding, GPU metrics.

Skipped without CUDA (CI has none); run on a GPU machine with `python -m pytest tests/test_gpu.py`
(benchmarks/gpu_check.sh does, first). Imports only torch/torchvision, PIL, numpy and mocoray's
core, data and gpu_metrics modules, so it also runs where Ray, MLflow and pyarrow are not installed.
"""

import inspect
import io
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import free_port
from mocoray.core.augment import BatchAugment, moco_spec
from mocoray.core.backbones import build_backbone
from mocoray.core.compiled import compile_encoders, make_sgd
from mocoray.core.crops import pad_images, resized_crops, sample_crops
from mocoray.core.moco import Encoder, MoCo, train_step
from mocoray.core.shuffle_bn import all_gather_batch, shuffle_batch, unshuffle_batch
from mocoray.data.device_decode import DeviceJpegAugment
from mocoray.data.synthetic import photo_like
from mocoray.detection.engine import train_one_epoch as train_detector
from mocoray.detection.model import build_detector
from mocoray.jobs.gpu_metrics import gpu_monitor
from test_compiled import _tiny_moco
from test_split_bn import _pair, _run

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


@pytest.fixture
def nccl_group():
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(free_port())
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


def _detector_batches(seed: int, steps: int) -> list[tuple]:
    """`steps` batches of two 64 px uint8 images with one box each, as `collate_detection` yields them."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g) for _ in range(2)]
        targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([1])} for _ in range(2)]
        batches.append((images, targets, 0))
    return batches


def _no_buffer_broadcast() -> dict:
    """DDP's option that stops re-broadcasting rank 0's buffers every forward (renamed in torch 2.10)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _syncbn_detector_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of a two-rank detection job on the one GPU. gloo carries the collectives: NCCL refuses two
    ranks on one device, and with a single rank SyncBatchNorm skips its synchronising kernels altogether."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for amp in ("none", "bf16"):  # run.amp's default and the GPU setting
            torch.manual_seed(0)  # the same initial detector on both ranks, as the job builds it
            model = build_detector("small_resnet", 2, layout="fpn", norm="syncbn", anchor_sizes=(16, 32, 64, 128),
                                   min_size=64, max_size=64, box_batch_size_per_image=32,
                                   rpn_post_nms_top_n_train=200).cuda()
            norms = {type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)}
            # Buffers are not re-broadcast from rank 0 each step, so equal running statistics after training
            # can only come from the synchronised BN.
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=[0], **_no_buffer_broadcast())
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
            epoch = train_detector(ddp, opt, _detector_batches(seed=10 + rank, steps=2), device="cuda",
                                   autocast_dtype=torch.bfloat16 if amp == "bf16" else None)
            stats = {k: v.cpu() for k, v in model.state_dict().items() if "running_mean" in k}
            results[amp] = {"norms": sorted(norms), "loss": epoch.loss, "steps": epoch.steps, "stats": stats}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_detector_with_syncbn_trains_on_two_ranks_with_one_set_of_bn_statistics(tmp_path):
    mp.spawn(_syncbn_detector_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for amp in ("none", "bf16"):
        a, b = r0[amp], r1[amp]
        assert a["norms"] == ["SyncBatchNorm"], (amp, a["norms"])
        assert a["steps"] == b["steps"] == 2 and all(torch.isfinite(torch.tensor([a["loss"], b["loss"]]))), amp
        assert a["stats"] and all(bool(v.abs().sum() > 0) for v in a["stats"].values()), amp  # statistics moved
        for k in a["stats"]:  # each rank saw other images: only synchronised BN gives both the same statistics
            assert torch.allclose(a["stats"][k], b["stats"][k], atol=1e-6, rtol=1e-5), (amp, k)


@pytest.mark.parametrize("amp", [False, True])
def test_split_bn_keeps_channels_last_on_cuda_and_matches_the_reshape_reference(amp):
    torch.manual_seed(0)
    N, C, H, W, G = 64, 32, 14, 14, 8
    new, ref = (m.cuda() for m in _pair(C, G))
    x = torch.randn(N, C, H, W, device="cuda") * 2 + 0.5
    x = (x.bfloat16() if amp else x).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(N, C, H, W, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        out, gx, gw, gb = _run(new, x, dy, amp=False)
        r_out, r_gx, r_gw, r_gb = _run(ref, x, dy, amp=False)
    assert out.is_contiguous(memory_format=torch.channels_last)
    atol, rtol = (0.05, 0.02) if amp else (1e-4, 1e-4)
    assert torch.allclose(out.float(), r_out.float(), atol=atol, rtol=rtol)
    assert torch.allclose(gx.float(), r_gx.float(), atol=atol, rtol=rtol)
    assert torch.allclose(gw, r_gw, atol=10 * atol, rtol=rtol) and torch.allclose(gb, r_gb, atol=10 * atol, rtol=rtol)
    assert torch.allclose(new.running_mean, ref.running_mean, atol=1e-3)
    assert torch.allclose(new.running_var, ref.running_var, rtol=5e-3)


def test_inductor_compiled_encoders_match_eager_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cl = torch.channels_last
    eager, compiled = _tiny_moco().cuda().to(memory_format=cl), _tiny_moco().cuda().to(memory_format=cl)
    compile_encoders(compiled)
    opts = [make_sgd(m.encoder_q.parameters(), 0.1, 0.9, 1e-4, "cuda") for m in (eager, compiled)]
    x = torch.randn(16, 3, 12, 12, device="cuda").contiguous(memory_format=cl)
    for step in range(3):
        losses = []
        for model, opt in zip((eager, compiled), opts, strict=True):
            torch.manual_seed(100 + step)
            losses.append(train_step(model, x, x.flip(-1).contiguous(memory_format=cl), opt).loss)
        assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    for a, b in zip(eager.state_dict().values(), compiled.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-4)


def test_fused_sgd_on_cuda_matches_the_multi_tensor_update():
    torch.manual_seed(0)
    params = [torch.randn(64, 32, device="cuda"), torch.randn(32, device="cuda")]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    finals = []
    for device_type in ("cuda", "cpu"):  # "cpu" picks foreach: the reference update, here on the GPU
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = make_sgd(ps, 0.1, 0.9, 1e-4, device_type)
        for g in grads:
            for p, gi in zip(ps, g, strict=True):
                p.grad = gi.clone()
            opt.step()
        finals.append(ps)
    for a, b in zip(*finals, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def _jpeg_tensor(seed: int, size: tuple[int, int]) -> torch.Tensor:
    buf = io.BytesIO()
    photo_like(seed, *size).save(buf, "JPEG", quality=90)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def test_nvjpeg_batch_decode_matches_cpu_decode_and_replaces_a_truncated_file():
    items = [_jpeg_tensor(i, size) for i, size in enumerate([(500, 375), (375, 500), (333, 250), (64, 48)])]
    aug = DeviceJpegAugment(moco_spec("v2", 224))
    gpu, replaced = aug.decode(items, torch.device("cuda"))
    cpu, _ = aug.decode(items, torch.device("cpu"))
    assert replaced == 0 and all(g.is_cuda for g in gpu)
    for g, c in zip(gpu, cpu, strict=True):
        assert g.shape == c.shape
        assert (g.cpu().float() - c.float()).abs().mean() < 1.5  # IDCT implementations differ by a level or so
    truncated = items[1][: items[1].numel() // 2].clone()
    images, replaced = aug.decode([items[0], truncated, items[2]], torch.device("cuda"))
    assert replaced == 1 and len(images) == 3
    im_q, im_k, replaced = aug.two_views(items + [truncated], "cuda")
    assert im_q.is_cuda and im_q.shape == im_k.shape == (5, 3, 224, 224) and replaced == 1
    assert im_q.dtype == torch.float32 and torch.isfinite(im_q).all() and torch.isfinite(im_k).all()


def test_fp16_crop_resampling_on_cuda_matches_fp32_on_cpu():
    torch.manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in [(375, 500), (500, 333), (90, 120)]]
    heights, widths = torch.tensor([375, 500, 90]), torch.tensor([500, 333, 120])
    boxes = torch.stack([sample_crops(heights, widths, (0.2, 1.0)) for _ in range(2)])
    flips = torch.tensor([[True, False, False], [False, True, False]])
    cpu = resized_crops(pad_images(images, torch.float32), boxes, flips, 224)
    gpu = resized_crops(pad_images([im.cuda() for im in images], torch.float16), boxes, flips, 224)
    assert (gpu.float().cpu() - cpu).abs().max() < 0.6  # under one 8-bit level


def test_gpu_monitor_reports_utilisation_and_memory_on_cuda():
    monitor = gpu_monitor("cuda", interval_s=0.05).start()
    a = torch.randn(4096, 4096, device="cuda")
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        a = (a @ a).clamp_(-1, 1)
    torch.cuda.synchronize()
    monitor.stop()
    averages = monitor.epoch_averages()
    assert averages["gpu_mem_used_gib"] > 0.05 and averages["gpu_mem_peak_allocated_gib"] > 0.05
    assert "gpu_util_pct" in averages, "NVML (libnvidia-ml.so.1) did not load"
    assert averages["gpu_util_pct"] > 10
