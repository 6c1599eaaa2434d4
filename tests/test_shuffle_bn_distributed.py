"""Shuffle BN across two real processes joined by a gloo process group."""


import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from mocoray.core.moco import Encoder, MoCo, train_step
from mocoray.core.shuffle_bn import shuffle_batch, unshuffle_batch
from mocoray.jobs.runtime import ddp_kwargs

B = 8  # per-rank batch


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # ranks' RNGs differ on purpose: the permutation must still agree
    try:
        # sample id i is the row [i, i, i]: every row says which global sample it is
        x = torch.arange(rank * B, (rank + 1) * B, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
        shuffles = []
        for _ in range(3):
            shuffled, undo = shuffle_batch(x)
            local, global_ = unshuffle_batch(shuffled * 10, undo)  # "encode" = x10, to see it came back
            shuffles.append({"ids": shuffled[:, 0].clone(), "local": local, "global": global_})

        # one MoCo step under DDP: both ranks must end with the same queue
        torch.manual_seed(0)
        backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                       torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        model = MoCo(Encoder(backbone, 8, 4, mlp=True), queue_size=12, momentum=0.9, temperature=0.2, bn_mode="shuffle")
        ddp = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs())
        opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1)
        torch.manual_seed(rank)
        for _ in range(2):
            train_step(ddp, torch.randn(B, 3, 8, 8), torch.randn(B, 3, 8, 8), opt)
        torch.save({"x": x, "shuffles": shuffles, "queue": model.queue.keys.clone(), "ptr": model.queue.ptr.clone(),
                    "w": model.encoder_q.backbone[0].weight.detach().clone(),
                    "wk": model.encoder_k.backbone[0].weight.detach().clone()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_shuffle_bn_across_two_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    everything = set(range(2 * B))
    for s0, s1 in zip(r0["shuffles"], r1["shuffles"], strict=True):
        ids0, ids1 = set(s0["ids"].long().tolist()), set(s1["ids"].long().tolist())
        # each rank encodes a different subset; together they are exactly the global batch
        assert ids0.isdisjoint(ids1) and ids0 | ids1 == everything
        # the subset is mixed: each rank sees keys from the other rank's batch
        assert ids0 & set(range(B, 2 * B)) and ids1 & set(range(B))
        # unshuffle restores the original order exactly, locally and globally
        assert torch.equal(s0["local"], r0["x"] * 10) and torch.equal(s1["local"], r1["x"] * 10)
        assert torch.equal(s0["global"], torch.cat([r0["x"], r1["x"]]) * 10)
        assert torch.equal(s0["global"], s1["global"])
    # the permutation is random: three draws are not all the same split
    splits = {tuple(sorted(s["ids"].long().tolist())) for s in r0["shuffles"]}
    assert len(splits) > 1
    # both ranks enqueued the same all-gathered keys, and DDP kept the encoders in sync
    assert torch.equal(r0["queue"], r1["queue"]) and int(r0["ptr"]) == int(r1["ptr"]) == (2 * 2 * B) % 12
    assert torch.equal(r0["w"], r1["w"]) and torch.equal(r0["wk"], r1["wk"])
