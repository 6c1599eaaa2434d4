"""MoCo v3 across two real processes joined by a gloo process group: the symmetric loss over all workers'
keys, the heads' global-batch BN, and a DDP step."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import free_port
from mocoray.core.moco import train_step
from mocoray.core.moco_v3 import (
    GlobalBatchNorm1d,
    GlobalBatchNorm2d,
    build_moco_v3,
    global_backbone_bn,
    symmetric_loss,
    weight_decay_groups,
)
from mocoray.jobs.runtime import ddp_kwargs

N, D, TAU = 4, 6, 0.2  # per-rank batch, feature size, temperature


def _views(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return {name: torch.randn(N, D, generator=g) for name in ("q1", "q2", "k1", "k2")}


def _bn_input(rank: int) -> torch.Tensor:
    # the ranks' batches differ in location and scale, so per-rank statistics would be visibly wrong
    return torch.randn(N, D, generator=torch.Generator().manual_seed(20 + rank)) * (1 + 2 * rank) + 3 * rank


def _bn2d_input(rank: int) -> torch.Tensor:
    # an image batch in channels_last memory, as the GPU path feeds a ResNet
    x = torch.randn(N, 3, 5, 5, generator=torch.Generator().manual_seed(30 + rank)) * (1 + rank) - 2 * rank
    return x.contiguous(memory_format=torch.channels_last)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        v = _views(rank)
        k1 = torch.cat([_views(r)["k1"] for r in range(world)])  # what the all-gather of keys gives
        k2 = torch.cat([_views(r)["k2"] for r in range(world)])
        loss, acc = symmetric_loss(v["q1"], v["q2"], k1, k2, TAU)

        bn = GlobalBatchNorm1d(D)
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 1.5, D))
            bn.bias.copy_(torch.linspace(-1, 1, D))
        x = _bn_input(rank).requires_grad_(True)
        y = bn(x)
        (y * torch.arange(1.0, D + 1)).pow(2).sum().backward()

        bn2 = GlobalBatchNorm2d(3)
        x2 = _bn2d_input(rank).requires_grad_(True)
        y2 = bn2(x2)
        (y2 * torch.arange(1.0, 4.0).view(1, 3, 1, 1)).pow(2).sum().backward()

        torch.manual_seed(0)  # same initial model on both ranks
        backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                       torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        global_backbone_bn(backbone)  # moco.backbone_bn: global, the default
        model = build_moco_v3(backbone, 8, dim=4, hidden_dim=16, proj_layers=3, momentum=0.9, temperature=TAU)
        ddp = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs())
        opt = torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=1e-2)
        torch.manual_seed(rank)
        step = train_step(ddp, torch.randn(N, 3, 8, 8), torch.randn(N, 3, 8, 8), opt)
        head_bn = model.encoder_q.head[1]
        torch.save({"loss": loss.detach(), "acc": acc, "y": y.detach(), "x_grad": x.grad, "running_mean": bn.running_mean,
                    "running_var": bn.running_var, "w_grad": bn.weight.grad, "step_loss": torch.tensor(step.loss),
                    "params": torch.cat([p.detach().flatten() for p in model.parameters()]),
                    "head_running_mean": head_bn.running_mean.clone(), "head_running_var": head_bn.running_var.clone(),
                    "y2": y2.detach().contiguous(), "x2_grad": x2.grad.contiguous(),
                    "bn2_running": torch.cat([bn2.running_mean, bn2.running_var]),
                    "backbone_bn_type": torch.tensor(isinstance(backbone[1], GlobalBatchNorm2d)),
                    "backbone_running": torch.cat([backbone[1].running_mean, backbone[1].running_var])},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _reference_ctr(q: torch.Tensor, k_all: torch.Tensor, rank: int) -> torch.Tensor:
    """InfoNCE written out: -log softmax of query i's logit with key i + N * rank, averaged, times 2 tau."""
    q, k_all = F.normalize(q, dim=1), F.normalize(k_all, dim=1)
    total = 0.0
    for i in range(q.shape[0]):
        logits = torch.stack([q[i] @ k for k in k_all]) / TAU
        total += -(logits[i + N * rank] - torch.logsumexp(logits, 0))
    return total / q.shape[0] * 2 * TAU


def test_moco_v3_on_two_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # symmetric loss: each view's queries against the other view's keys of BOTH ranks, positive at i + N*rank
    k1 = torch.cat([_views(r)["k1"] for r in range(2)])
    k2 = torch.cat([_views(r)["k2"] for r in range(2)])
    for rank in range(2):
        v = _views(rank)
        expected = _reference_ctr(v["q1"], k2, rank) + _reference_ctr(v["q2"], k1, rank)
        torch.testing.assert_close(out[rank]["loss"], expected, rtol=1e-5, atol=1e-6)
        # with the labels of rank 0 on rank 1 the loss would differ: the offset matters
        assert not torch.allclose(_reference_ctr(v["q1"], k2, 1 - rank), _reference_ctr(v["q1"], k2, rank))

    # the heads' BN normalises over the global batch: the same as one BatchNorm1d over both ranks' rows,
    # in output, input gradients and running statistics (identical on both ranks)
    ref = torch.nn.BatchNorm1d(D)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 1.5, D))
        ref.bias.copy_(torch.linspace(-1, 1, D))
    x = torch.cat([_bn_input(r) for r in range(2)]).requires_grad_(True)
    y = ref(x)
    (y * torch.arange(1.0, D + 1)).pow(2).sum().backward()
    torch.testing.assert_close(torch.cat([o["y"] for o in out]), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([o["x_grad"] for o in out]), x.grad, rtol=1e-4, atol=1e-4)
    # each rank's weight gradient is its own rows' share (DDP sums them): together they are the whole one
    torch.testing.assert_close(out[0]["w_grad"] + out[1]["w_grad"], ref.weight.grad, rtol=1e-4, atol=1e-4)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(out[0][name], getattr(ref, name), rtol=1e-5, atol=1e-6)
        assert torch.equal(out[0][name], out[1][name])

    # a DDP step of the whole model: same parameters and head BN statistics on both ranks afterwards
    assert torch.isfinite(out[0]["step_loss"])
    assert torch.equal(out[0]["params"], out[1]["params"])
    assert torch.equal(out[0]["head_running_mean"], out[1]["head_running_mean"])
    assert torch.equal(out[0]["head_running_var"], out[1]["head_running_var"])

    # the backbone's BN (moco.backbone_bn: global): one BatchNorm2d over both ranks' images, channels_last
    ref2 = torch.nn.BatchNorm2d(3)
    x2 = torch.cat([_bn2d_input(r) for r in range(2)]).requires_grad_(True)
    y2 = ref2(x2)
    (y2 * torch.arange(1.0, 4.0).view(1, 3, 1, 1)).pow(2).sum().backward()
    torch.testing.assert_close(torch.cat([o["y2"] for o in out]), y2.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([o["x2_grad"] for o in out]), x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[0]["bn2_running"], torch.cat([ref2.running_mean, ref2.running_var]))
    # converted in the model: after a step on different images per rank, the same statistics on both
    assert bool(out[0]["backbone_bn_type"])
    assert torch.equal(out[0]["backbone_running"], out[1]["backbone_running"])
