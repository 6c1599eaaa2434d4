"""BatchNorm running statistics: one set across ranks after every epoch, and recomputed for random-init encoders."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import free_port
from mocoray.config import load_config
from mocoray.core.moco import unwrap
from mocoray.data.synthetic import synthetic_images
from mocoray.jobs.faults import Faults
from mocoray.jobs.pretrain.loop import build_moco, train_one_epoch
from mocoray.jobs.pretrain.state import TrainState
from mocoray.jobs.pretrain.views import train_loader, two_views
from mocoray.jobs.runtime import ddp_kwargs


def _bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k}


def _one_epoch_on_two_ranks(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = load_config(None, ["model.arch=small_resnet", "moco.queue_size=64", "moco.momentum=0.9",
                                 "data.name=synthetic", "data.synthetic_images=64", "data.image_size=16",
                                 "optim.batch_size=16", "optim.epochs=1", "run.num_workers=2"])
        torch.manual_seed(0)  # the same initial model on both ranks, as in the job
        model = build_moco(cfg, "shuffle")
        ddp = nn.parallel.DistributedDataParallel(model, **ddp_kwargs())
        optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        torch.manual_seed(1 + rank)
        data = synthetic_images(64, 4, 16, seed=0)
        loader, sampler = train_loader(cfg, data, rank, world)  # each rank gets its own half of the images
        sampler.set_epoch(0)
        train_one_epoch(ddp, loader, optimizer, scaler, two_views(cfg), cfg, 0, TrainState(), torch.device("cpu"),
                        False, rank, Faults())
        probe = synthetic_images(16, 4, 16, seed=5).images.float() / 255
        backbone = unwrap(ddp).encoder_q.backbone.eval()
        with torch.no_grad():
            features = backbone(probe)  # what this rank's share of the kNN bank is extracted with
        torch.save({"state": _bn_buffers(unwrap(ddp)), "features": features, "mine": list(iter(sampler))},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_bn_statistics_are_one_set_across_ranks_after_an_epoch_on_different_data(tmp_path):
    mp.spawn(_one_epoch_on_two_ranks, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert set(r0["mine"]).isdisjoint(r1["mine"])  # the ranks really trained on different images
    keys = list(r0["state"])
    assert any(k.startswith("encoder_q.") for k in keys) and any(k.startswith("encoder_k.") for k in keys)
    for k in keys:  # what the checkpoint (rank 0's state) holds is what every rank evaluates with
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert torch.equal(r0["features"], r1["features"])


def _average_on_two_ranks(rank: int, world: int, port: int, out_dir: str) -> None:
    from mocoray.core.bn_stats import average_bn_statistics

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2), nn.Linear(2, 2), nn.BatchNorm1d(2))
        net.register_buffer("not_bn", torch.full((2,), float(rank)))
        with torch.no_grad():
            net[1].running_mean.copy_(torch.tensor([1.0, 2.0]) * (rank + 1))  # rank 0: 1, 2; rank 1: 2, 4
            net[1].running_var.copy_(torch.tensor([3.0, 5.0]) + 2 * rank)  # rank 0: 3, 5; rank 1: 5, 7
            net[3].running_mean.fill_(10.0 * rank)
            net[1].num_batches_tracked.fill_(7)
        average_bn_statistics(net)
        torch.save(dict(net.state_dict()), f"{out_dir}/avg{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_bn_statistics_average_is_the_mean_over_ranks_of_running_mean_and_var_only(tmp_path):
    mp.spawn(_average_on_two_ranks, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    s0, s1 = (torch.load(tmp_path / f"avg{r}.pt", weights_only=True) for r in range(2))
    for s in (s0, s1):
        assert s["1.running_mean"].tolist() == [1.5, 3.0] and s["1.running_var"].tolist() == [4.0, 6.0]
        assert s["3.running_mean"].tolist() == [5.0, 5.0] and int(s["1.num_batches_tracked"]) == 7
    assert s0["not_bn"].tolist() == [0.0, 0.0] and s1["not_bn"].tolist() == [1.0, 1.0]  # only BN statistics


def test_recomputed_statistics_are_the_mean_and_unbiased_variance_of_the_calibration_batches():
    from mocoray.core.bn_stats import recompute_bn_statistics

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.1), nn.ReLU())
    batches = [torch.randn(8, 3, 6, 6) * 3 + 1 for _ in range(3)]
    with torch.no_grad():
        conv_out = [net[0](x) for x in batches]  # what BN sees
    # the calibration averages the per-batch statistics (equal batches): running mean = overall mean,
    # running var = mean of the batches' unbiased variances
    ref_mean = torch.stack([c.mean(dim=(0, 2, 3)) for c in conv_out]).mean(0)
    ref_var = torch.stack([c.var(dim=(0, 2, 3), unbiased=True) for c in conv_out]).mean(0)
    net.eval()
    recompute_bn_statistics(net, batches)
    torch.testing.assert_close(net[1].running_mean, ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[1].running_var, ref_var, rtol=1e-5, atol=1e-5)
    assert not net.training and net[1].momentum == 0.1  # the module is left as it was found

