"""The global sample order: the same for any number of workers, and a mid-epoch start skips exactly what was used."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from mocoray.data import TensorImages
from mocoray.data.sampler import GlobalBatchSampler, epoch_permutation


def _global_batches(num_samples: int, batch: int, world: int, seed: int, epoch: int, start_step: int = 0):
    """The global batches as the ranks' samplers serve them: step s = rank 0's slice, rank 1's slice, ..."""
    per_rank = []
    for rank in range(world):
        sampler = GlobalBatchSampler(num_samples, batch, rank, world, seed)
        sampler.set_epoch(epoch, start_step)
        per_rank.append(list(sampler))
        assert len(sampler) == len(per_rank[-1])
    b = batch // world
    steps = len(per_rank[0]) // b
    return [sum((ranks[s * b : (s + 1) * b] for ranks in per_rank), []) for s in range(steps)]


def test_one_two_and_four_workers_train_on_the_same_global_batches_in_the_same_order():
    n, batch, seed, epoch = 103, 8, 7, 3
    one = _global_batches(n, batch, 1, seed, epoch)
    assert _global_batches(n, batch, 2, seed, epoch) == one
    assert _global_batches(n, batch, 4, seed, epoch) == one
    # the order is the epoch's seeded permutation cut into batches; the 103 % 8 = 7 leftover samples are unused
    perm = epoch_permutation(n, seed, epoch).tolist()
    assert one == [perm[i : i + batch] for i in range(0, 96, batch)]
    assert len({i for b in one for i in b}) == 96


def test_the_order_changes_with_the_epoch_and_the_seed():
    base = _global_batches(64, 8, 2, seed=0, epoch=0)
    assert _global_batches(64, 8, 2, seed=0, epoch=1) != base
    assert _global_batches(64, 8, 2, seed=1, epoch=0) != base
    assert _global_batches(64, 8, 2, seed=0, epoch=0) == base


@pytest.mark.parametrize("world_before, world_after", [(2, 2), (2, 1), (1, 4)])
def test_a_mid_epoch_start_skips_exactly_the_consumed_samples(world_before, world_after):
    n, batch, seed, epoch, done = 100, 8, 3, 2, 5  # 12 steps per epoch, 5 trained before the stop
    full = _global_batches(n, batch, world_before, seed, epoch)
    resumed = _global_batches(n, batch, world_after, seed, epoch, start_step=done)
    assert resumed == full[done:]
    used_before = {i for b in full[:done] for i in b}
    assert not used_before & {i for b in resumed for i in b}


def test_a_start_at_the_end_of_the_epoch_serves_nothing_and_a_start_beyond_it_is_refused():
    sampler = GlobalBatchSampler(32, 8, 0, 2, seed=0)
    sampler.set_epoch(0, start_step=4)
    assert list(sampler) == [] and len(sampler) == 0
    with pytest.raises(ValueError, match="start_step 5 outside an epoch of 4 steps"):
        sampler.set_epoch(0, start_step=5)
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        GlobalBatchSampler(32, 8, 0, 3, seed=0)


def test_a_dataloader_over_tensor_images_serves_the_ranks_slices_as_batches():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 3, 2, 2).contiguous()
    data = TensorImages(images, torch.zeros(40, dtype=torch.long), num_classes=1)
    sampler = GlobalBatchSampler(len(data), 8, rank=1, world_size=2, seed=5)
    sampler.set_epoch(1, start_step=2)
    loader = DataLoader(data, batch_size=4, sampler=sampler, collate_fn=lambda items: items[0][0])
    served = [batch[:, 0, 0, 0].tolist() for batch in loader]
    expected = [b[4:] for b in _global_batches(40, 8, 1, 5, 1)[2:]]
    assert served == expected and len(loader) == 3
