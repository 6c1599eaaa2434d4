"""A quick look at a dataset on the driver, before Ray starts: how many training images (up to what a batch
needs) and how many classes, without reading the whole dataset."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import DatasetNotFoundError
from .files import IMAGE_EXTENSIONS, find_classes

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from ..config import DataConfig

KNOWN_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10}  # by the datasets' definitions


@dataclass
class DataPeek:
    images: int | None  # training images, counted up to `enough` (exact below it); None: not counted cheaply
    classes: int | None


def peek(cfg: DataConfig, enough: int) -> DataPeek:
    """Training images (stopping at `enough`) and classes of `cfg`'s dataset, after `data.max_images`.

    Image folders and Parquet shards are listed lazily; an empty train or val split raises
    DatasetNotFoundError naming the field. CIFAR and STL-10 are not opened (their sizes are in the
    thousands); the workers check their files.
    """
    images, classes = _peek_source(cfg, enough)
    if cfg.max_images is not None:
        images = cfg.max_images if images is None else min(images, cfg.max_images)
    return DataPeek(images, classes)


def _peek_source(cfg: DataConfig, enough: int) -> tuple[int | None, int | None]:
    if cfg.name == "synthetic":
        return cfg.synthetic_images, cfg.synthetic_classes
    if cfg.name in ("scattered-digits", "digits"):
        from .digits import train_size

        return train_size(cfg.name == "scattered-digits"), 10
    if cfg.name == "imagefolder":
        return _peek_folders(cfg.root, cfg.val_root, enough)  # type: ignore[arg-type]
    if cfg.name == "parquet":
        return _peek_shards(cfg.root, cfg.val_root, enough)  # type: ignore[arg-type]
    return None, KNOWN_CLASSES.get(cfg.name)


def _count_images(fs: AbstractFileSystem, folder: str, classes: list[str], enough: int) -> int:
    n = 0
    for name in classes:
        n += sum(1 for p in fs.find(posixpath.join(folder, name)) if p.lower().endswith(IMAGE_EXTENSIONS))
        if n >= enough:
            break
    return n


def _peek_folders(root: str, val_root: str | None, enough: int) -> tuple[int, int]:
    from .external import imagefolder_layout
    from .files import display

    layout = imagefolder_layout(root, val_root)
    classes = find_classes(layout.fs, layout.train_dir)
    where = display(layout.fs, layout.train_dir)
    if not classes:
        raise DatasetNotFoundError(f"data.root: no class sub-folders in {where} (expected {where}/<class>/<image>)")
    images = _count_images(layout.fs, layout.train_dir, classes, enough)
    if images == 0:
        raise DatasetNotFoundError(f"data.root: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders "
                                   f"of {where}")
    val_where = display(layout.fs_val, layout.val_dir)
    if _count_images(layout.fs_val, layout.val_dir, find_classes(layout.fs_val, layout.val_dir), 1) == 0:
        raise DatasetNotFoundError(f"{layout.val_field}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class "
                                   f"folders of {val_where}")
    return images, len(classes)


def _peek_shards(root: str, val_root: str | None, enough: int) -> tuple[int, int | None]:
    import pyarrow.parquet as pq

    from .external import parquet_shards
    from .parquet import classes_from_metadata

    fs, train_shards, _, _ = parquet_shards(root, val_root)
    images, classes = 0, None
    for shard in train_shards:
        with fs.open(shard, "rb") as f:
            meta = pq.read_metadata(f)
        images += meta.num_rows
        if classes is None:
            names = classes_from_metadata(meta.schema.to_arrow_schema().metadata)
            classes = len(names) if names else None
        if images >= enough:
            break
    if images == 0:
        raise DatasetNotFoundError(f"data.root: the Parquet shards under {root} hold no images")
    return images, classes
