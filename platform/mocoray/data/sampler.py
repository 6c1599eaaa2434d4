"""The epoch's global sample order: one seeded permutation, cut into global batches, split across ranks.

Step s of epoch e trains on the global batch `perm_e[s*B : (s+1)*B]` (B = global batch size), and rank
r of W takes its r-th slice of B/W samples. The order depends on (seed, epoch) only, never on W, so a
run that resumes mid-epoch on another number of workers trains on exactly the samples it had not used
yet, in the same global batches; and since keys are enqueued in rank order, the queue sees the same
keys in the same order as well.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of all samples in `epoch` (what every world size shares)."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch))


class GlobalBatchSampler(Sampler[int]):
    """This rank's indices, batch after batch, from step `start_step` of the current epoch on.

    The samples that do not fill a last global batch are left out of the epoch (as with drop_last).
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.per_rank = global_batch // world_size
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Serve `epoch` from its step `start_step` (the steps before it were trained already)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside an epoch of {self.steps_per_epoch} steps")
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[int]:
        perm = epoch_permutation(self.num_samples, self.seed, self.epoch)
        steps = perm[: self.steps_per_epoch * self.global_batch].view(self.steps_per_epoch, self.world_size, -1)
        return iter(steps[self.start_step :, self.rank].flatten().tolist())

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.per_rank
