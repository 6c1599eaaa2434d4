"""Datasets for pretraining and evaluation, chosen by `data.name` in the config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (
    CorruptImageError,
    DatasetNotFoundError,
    PretrainData,
    SkipCorrupt,
    TensorImages,
    collate_batch,
    image_batches,
    take,
)

if TYPE_CHECKING:  # config needs pydantic; the data layer itself does not
    from ..config import DataConfig

__all__ = [
    "CorruptImageError",
    "DatasetNotFoundError",
    "PretrainData",
    "SkipCorrupt",
    "TensorImages",
    "build_pretrain_data",
    "collate_batch",
    "check_paths",
    "image_batches",
    "labelled_splits",
    "take",
]


def labelled_splits(cfg: DataConfig) -> tuple:
    """(train, val, num_classes) labelled datasets for `cfg`: the kNN monitor and linear eval use them."""
    name = cfg.name
    if name == "scattered-digits":
        from .digits import scattered_digits

        train, val = scattered_digits()
        return train, val, 10
    if name == "digits":
        from .digits import plain_digits

        train, val = plain_digits()
        return train, val, 10
    if name == "synthetic":
        from .synthetic import synthetic_images

        train = synthetic_images(cfg.synthetic_images, cfg.synthetic_classes, cfg.image_size, seed=0)
        val = synthetic_images(max(8, cfg.synthetic_images // 4), cfg.synthetic_classes, cfg.image_size, seed=1)
        return train, val, cfg.synthetic_classes
    from .external import external_splits

    return external_splits(cfg)


def build_pretrain_data(cfg: DataConfig) -> PretrainData:
    """Training images (labels unused) and the labelled kNN bank / validation split."""
    train, val, num_classes = labelled_splits(cfg)
    bank = train
    if cfg.name == "stl10":  # the standard protocol pretrains on unlabeled + train (105k images)
        from torch.utils.data import ConcatDataset

        from .external import stl10_unlabeled

        train = ConcatDataset([train, stl10_unlabeled(cfg.root)])
    train = take(train, cfg.max_images)
    return PretrainData(train=train, knn_bank=bank, knn_val=val, num_classes=num_classes, image_size=cfg.image_size)


def check_paths(cfg: DataConfig, fields: tuple[str, ...] = ("root", "val_root")) -> None:
    """Fail fast, on the driver, when a configured dataset path does not exist (names the field).

    `fields`: the config's path fields (a detection config adds its annotation files)."""
    import fsspec

    for field in fields:
        value = getattr(cfg, field)
        if not value or any(ch in value for ch in "*?["):  # globs are resolved by the dataset itself
            continue
        try:
            fs, path = fsspec.core.url_to_fs(value)
            exists = fs.exists(path)
        except ImportError:  # a remote filesystem whose driver is only installed on the workers
            continue
        if not exists:
            raise DatasetNotFoundError(f"data.{field}: {value} does not exist (data.name={cfg.name!r})")
