"""A random-init encoder's BN statistics recomputed on training images: the fair baseline both jobs measure."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import Dataset

from ..core.augment import normalize_batch
from ..core.bn_stats import average_bn_statistics, recompute_bn_statistics
from ..core.distributed import rank_world
from ..core.features import shard_indices
from ..data import image_batches

CALIBRATION_IMAGES = 2048  # enough for stable statistics; a fixed random choice, shared out over the ranks
CALIBRATION_BATCH = 256


def recompute_bn_on_images(backbone: nn.Module, dataset: Dataset, image_size: int, device: torch.device,
                           channels_last: bool = False, loader_workers: int = 0) -> None:
    """Recompute `backbone`'s BN statistics from up to CALIBRATION_IMAGES images of `dataset` (centre views,
    normalised as for feature extraction); every rank ends with the same statistics (averaged over ranks)."""
    rank, world = rank_world()
    total = len(dataset)  # type: ignore[arg-type]
    n = min(total, CALIBRATION_IMAGES)
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n].tolist()
    mine = [chosen[i] for i in shard_indices(n, rank, world)]
    # equal batches: each one's statistics count the same in the average, and none is a tiny remainder
    per_batch = math.ceil(len(mine) / math.ceil(len(mine) / CALIBRATION_BATCH))

    def batches():
        for images, _ in image_batches(dataset, mine, per_batch, image_size, loader_workers):
            x = normalize_batch(images.to(device, non_blocking=True), size=image_size)
            yield x.contiguous(memory_format=torch.channels_last) if channels_last else x

    recompute_bn_statistics(backbone, batches())
    average_bn_statistics(backbone)
