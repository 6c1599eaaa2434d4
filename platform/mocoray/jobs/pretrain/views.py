"""The worker's batches and their two MoCo views: the loader of its share of each global batch, the
augmentation recipe, and the function that turns a batch into (im_q, im_k) on the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from ...config import PretrainConfig
from ...core.augment import AugmentSpec, BatchAugment, moco_spec, two_view_transform
from ...data.base import Resized, SkipCorrupt, TensorImages, Transformed, collate_batch
from ...data.device_decode import DeviceJpegAugment, collate_encoded, encoded_train_dataset
from ...data.ray_ingest import ShardLoader
from ...data.sampler import GlobalBatchSampler


def augment_spec(cfg: PretrainConfig) -> AugmentSpec:
    """The two-view recipe of `moco.version` at `data.image_size`, with the recipe's own crop, blur, colour
    jitter and flip."""
    spec = moco_spec(cfg.moco.version, cfg.data.image_size, cfg.data.blur, (cfg.data.crop_min_scale, 1.0))
    spec = dataclasses.replace(spec, flip_p=cfg.data.flip_p)
    s = cfg.data.color_jitter
    return spec if s is None else dataclasses.replace(spec, jitter=(s, s, s, min(s, spec.jitter[3])))


def train_loader(cfg: PretrainConfig, dataset, rank: int, world: int) -> tuple[DataLoader, GlobalBatchSampler]:
    """Batches of encoded files (GPU decode), uint8 images (device augmentation) or of two augmented views
    (loader augmentation): this rank's share of each global batch."""
    collate = collate_batch
    if cfg.data.decode == "gpu":
        dataset, collate = encoded_train_dataset(dataset), collate_encoded
    elif cfg.data.augment == "loader":
        spec = augment_spec(cfg)
        dataset = Transformed(SkipCorrupt(dataset), two_view_transform(spec))
    elif not isinstance(dataset, TensorImages):
        dataset = Resized(SkipCorrupt(dataset), cfg.data.image_size)
    sampler = GlobalBatchSampler(len(dataset), cfg.optim.batch_size, rank, world, cfg.run.seed)
    loader = DataLoader(
        dataset,
        batch_size=cfg.optim.batch_size // world,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.data.loader_workers,
        collate_fn=collate,
        pin_memory=cfg.run.use_gpu,
        persistent_workers=cfg.data.loader_workers > 0,
        # Its own generator: each epoch's iterator draws a seed, which must not come from the global RNG
        # (a run resumed mid-epoch would draw it at another point, and its augmentations would change).
        generator=torch.Generator().manual_seed(cfg.run.seed * 1000 + rank),
    )
    return loader, sampler


def two_view_item(batch: dict) -> tuple:
    """A `data.loader: ray` batch as `train_loader`'s items: `(views, sample ids, images replaced)`."""
    return (batch["view_q"], batch["view_k"]), batch["id"], int(batch["replaced"].sum())


def ray_train_loader(cfg: PretrainConfig, num_images: int, world: int, clock) -> ShardLoader:
    """The `data.loader: ray` counterpart of `train_loader`, inside a Ray Train worker."""
    import ray.train

    return ShardLoader(ray.train.get_dataset_shard("train"), clock, cfg.optim.batch_size // world,
                       num_images // cfg.optim.batch_size, cfg.data.ingest.prefetch_batches, two_view_item)


TwoViews = Callable[[Any, torch.device], tuple[torch.Tensor, torch.Tensor, int]]


def two_views(cfg: PretrainConfig) -> TwoViews:
    """batch -> (im_q, im_k, images replaced) on the device, for whatever `train_loader` serves."""
    spec = augment_spec(cfg)
    if cfg.data.decode == "gpu":
        return DeviceJpegAugment(spec).two_views
    if cfg.data.augment == "device" and cfg.data.loader == "torch":
        augment = BatchAugment(spec)
        return lambda x, device: (*augment.two_views(x.to(device, non_blocking=True)), 0)
    return lambda x, device: (x[0].to(device, non_blocking=True), x[1].to(device, non_blocking=True), 0)
