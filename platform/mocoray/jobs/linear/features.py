"""What the linear protocol trains on: the frozen backbone (and the check that it never moves), the
labelled views, and the fc layer's inputs (features cached once, or images through the backbone per step).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ...config import LinearConfig
from ...core.amp import autocast
from ...core.augment import AugmentSpec, BatchAugment, normalize_batch
from ...core.distributed import rank_world
from ...core.features import extract_features
from ...core.vit import ViTBackbone
from ...data import image_batches
from ...data.base import Resized, SkipCorrupt, TensorImages, Transformed, collate_batch, to_uint8_tensor
from ...data.ray_ingest import MakeRows, make_labelled_view
from ...encoders import EncoderSource, load_backbone


class BackboneChangedError(RuntimeError):
    """The frozen backbone's weights or BN statistics moved during linear evaluation."""


def build_frozen_backbone(encoder: EncoderSource, seed: int = 0, vit_pool: str = "cls") -> tuple[nn.Module, int]:
    """The encoder's backbone, frozen: eval mode (BN uses its running statistics and never updates them)
    and requires_grad False. A ViT gives its class token or its mean patch token (`vit_pool`)."""
    backbone, feat_dim = load_backbone(encoder, seed)
    if isinstance(backbone, ViTBackbone):
        backbone.set_pool(vit_pool)
    elif vit_pool != "cls":
        raise ValueError(f"encoder.vit_pool={vit_pool!r} is for ViT encoders; {encoder.arch} is not one")
    backbone.requires_grad_(False)
    backbone.eval()
    return backbone, feat_dim


def backbone_snapshot(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer (BN running statistics included)."""
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}


def assert_backbone_unchanged(backbone: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    """Raise BackboneChangedError unless every tensor is bit-identical to `reference`."""
    current = backbone.state_dict()
    changed = [k for k, v in reference.items() if k not in current or not torch.equal(current[k].detach(), v)]
    if changed:
        raise BackboneChangedError(
            f"the frozen backbone changed during linear evaluation: {len(changed)} of {len(reference)} tensors "
            f"differ (first: {', '.join(changed[:4])}). The protocol requires eval mode and no gradients "
            "for the backbone; its result is not a linear evaluation."
        )


class LinearHead(nn.Module):
    """What the linear protocol trains: an fc layer, after an affine-free BatchNorm of the features with
    `feature_norm="batchnorm"` (it only standardises them, so the fc's lr stops depending on the encoder's
    feature scale; it has no weights, so the classifier stays linear in the features at evaluation)."""

    def __init__(self, feat_dim: int, num_classes: int, feature_norm: str = "none") -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(feat_dim, affine=False) if feature_norm == "batchnorm" else nn.Identity()
        self.fc = nn.Linear(feat_dim, num_classes)
        self.fc.weight.data.normal_(mean=0.0, std=0.01)
        self.fc.bias.data.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(features))


class CenterCrop(Dataset):
    """`(uint8 3 x size x size, label)`: shorter side resized to `resize`, then the central size x size."""

    def __init__(self, base: Dataset, size: int, resize: int) -> None:
        self.base, self.size, self.resize = base, size, resize

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.base[i]
        t = to_uint8_tensor(img, self.resize)
        top = (t.shape[-2] - self.size) // 2
        left = (t.shape[-1] - self.size) // 2
        return t[:, top : top + self.size, left : left + self.size].contiguous(), label


def center_views(dataset: Dataset, size: int, resize: int | None) -> Dataset:
    """The deterministic evaluation view of every image (in-memory sets are converted once)."""
    resize = resize or size
    if isinstance(dataset, TensorImages):
        if dataset.images.shape[-1] == size == resize and dataset.images.shape[-2] == size:
            return dataset
        view = CenterCrop(dataset, size, resize)
        images = torch.stack([view[i][0] for i in range(len(view))])
        return TensorImages(images, dataset.labels, dataset.num_classes)
    return CenterCrop(dataset, size, resize)


def _loader(dataset: Dataset, batch_size: int, sampler, workers: int, pin: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_batch, pin_memory=pin, persistent_workers=workers > 0)


def _as_loader_items(dataset: Dataset, size: int) -> Dataset:
    """Items the DataLoader + collate_batch understand: TensorImages as is, others as resized uint8 tensors."""
    return dataset if isinstance(dataset, TensorImages) else Resized(SkipCorrupt(dataset), size)


def _augment_spec(cfg: LinearConfig) -> AugmentSpec:
    return AugmentSpec(cfg.data.image_size, crop_scale=(cfg.linear.crop_min_scale, 1.0), jitter=(0.0, 0.0, 0.0, 0.0),
                       jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.5 if cfg.linear.flip else 0.0)


def train_transform(cfg: LinearConfig):
    """The augmented protocol's per-image torchvision transform: RandomResizedCrop + flip + normalise."""
    from torchvision import transforms as T

    spec = _augment_spec(cfg)
    ops = [T.RandomResizedCrop(spec.size, scale=spec.crop_scale)]
    if cfg.linear.flip:
        ops.append(T.RandomHorizontalFlip())
    return T.Compose([*ops, T.ToTensor(), T.Normalize(spec.mean, spec.std)])


def ingest_rows(cfg: LinearConfig, train_raw: Dataset) -> MakeRows:
    """What the ingest tasks make of a chunk with `data.loader: ray` (augmented protocol): each sample's training
    view as the torch path makes it (`train_transform` per image; an in-memory set with `data.augment: device`:
    `BatchAugment` of the same spec on its stored images) and its label."""
    batched = isinstance(train_raw, TensorImages) and cfg.data.augment == "device"
    return partial(make_labelled_view, spec=_augment_spec(cfg), transform=None if batched else train_transform(cfg),
                   run_seed=cfg.run.seed)


def labelled_view_item(batch: dict) -> tuple:
    """A `data.loader: ray` batch as the torch path's loader items: `(views, labels, sample ids)`."""
    return batch["view"], batch["label"], batch["id"]


def _training_views(cfg: LinearConfig, train_raw: Dataset, train_center: Dataset | None
                    ) -> tuple[Dataset, BatchAugment | None]:
    """What the train loader serves in the center / augmented protocols, and the batched augmentation
    to apply to it on the device (in-memory images) if the loader does not augment itself."""
    if cfg.linear.mode == "center":
        return _as_loader_items(train_center, cfg.data.image_size), None  # type: ignore[arg-type]
    if isinstance(train_raw, TensorImages) and cfg.data.augment == "device":
        return train_raw, BatchAugment(_augment_spec(cfg))
    return Transformed(SkipCorrupt(train_raw), train_transform(cfg)), None


class CachedFeatures:
    """Centre-crop features of the train and val images, extracted once (the `cached` protocol)."""

    def __init__(self, backbone: nn.Module, train: Dataset, val: Dataset, cfg: LinearConfig, device: torch.device):
        size = cfg.data.image_size

        def features(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
            return extract_features(
                backbone, len(dataset),  # type: ignore[arg-type]
                lambda idx: image_batches(dataset, idx, cfg.linear.eval_batch_size, size, cfg.data.loader_workers),
                device, size, cfg.run.channels_last,
            )

        with autocast(device.type, cfg.run.amp):
            self.train_f, self.train_y = features(train)
            self.val_f, self.val_y = features(val)
        self.num_train = self.train_f.shape[0]

    def train_batches(self, sampler: DistributedSampler, per_worker: int):
        order = torch.as_tensor(list(iter(sampler)), device=self.train_f.device)
        for i in range(0, len(order), per_worker):
            idx = order[i : i + per_worker]
            yield self.train_f[idx], self.train_y[idx]

    def val_batches(self):
        """Every rank evaluates all of val (no counts to sum)."""
        yield self.val_f, self.val_y


class StreamedFeatures:
    """Images through the frozen backbone at every step (the `augmented` and `center` protocols)."""

    def __init__(self, backbone: nn.Module, train_raw: Dataset, train_center: Dataset | None, val_center: Dataset,
                 cfg: LinearConfig, device: torch.device, sampler: DistributedSampler | None, unfrozen: bool,
                 train_loader=None) -> None:
        """`train_loader`: the `data.loader: ray` shard's (views, labels, sample ids) batches, the views made by
        the ingest tasks; None: a DataLoader of `train_raw`'s views with `sampler`. Validation always reads
        `val_center` here, each rank its share (a single pass that must see every image)."""
        self.backbone, self.cfg, self.device, self.unfrozen = backbone, cfg, device, unfrozen
        rank, world = rank_world()
        pin, workers, size = device.type == "cuda", cfg.data.loader_workers, cfg.data.image_size
        mine = list(range(rank, len(val_center), world))  # type: ignore[arg-type]
        val_part = val_center.subset(mine) if isinstance(val_center, TensorImages) else Subset(val_center, mine)
        self.val_loader = _loader(_as_loader_items(val_part, size), cfg.linear.eval_batch_size, None, workers, pin)
        self.num_train = len(train_raw)  # type: ignore[arg-type]
        if train_loader is not None:
            self.train_loader, self.augment = train_loader, None
            return
        train_items, self.augment = _training_views(cfg, train_raw, train_center)
        self.train_loader = _loader(train_items, cfg.optim.batch_size // world, sampler, workers, pin)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(self.unfrozen), autocast(self.device.type, self.cfg.run.amp):
            return self.backbone(x).float()  # the fc layer always trains in float32

    def train_batches(self, sampler, per_worker: int, record: Callable[[int, torch.Tensor], None] | None = None):
        """(features, labels) per step; `record(step, sample ids)` for each batch (`data.loader: ray` only)."""
        for step, (x, y, keys) in enumerate(self.train_loader):
            if record is not None:
                record(step, keys)
            x = x.to(self.device, non_blocking=True)
            if self.augment is not None:
                x = self.augment(x)
            elif x.dtype == torch.uint8:
                x = normalize_batch(x, size=self.cfg.data.image_size)
            yield self._features(x), y.to(self.device, non_blocking=True)

    def val_batches(self):
        for x, y, _ in self.val_loader:
            x = normalize_batch(x.to(self.device, non_blocking=True), size=self.cfg.data.image_size)
            yield self._features(x), y.to(self.device)
