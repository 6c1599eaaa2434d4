"""A quick look at a dataset on the driver, before Ray starts: how many training images (up to what a batch
needs), how many classes, and (for image folders) whether a sample of the files decodes, without reading the
whole dataset."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import CorruptImageError, DatasetNotFoundError
from .files import IMAGE_EXTENSIONS, decode_image, display, find_classes, read_bytes

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from ..config import DataConfig

KNOWN_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10}  # by the datasets' definitions
DECODE_SAMPLE = 32  # image files tried per folder before training: one that decodes is enough


@dataclass
class DataPeek:
    images: int | None  # training images, counted up to `enough` (exact below it); None: not counted cheaply
    classes: int | None


def peek(cfg: DataConfig, enough: int) -> DataPeek:
    """Training images (stopping at `enough`) and classes of `cfg`'s dataset, after `data.max_images`.

    Image folders and Parquet shards are listed lazily; an empty train or val split raises
    DatasetNotFoundError naming the field, and so does an image folder in which none of up to
    DECODE_SAMPLE files spread over its classes decodes (training skips corrupt files, but a folder of only
    corrupt ones would fail inside the workers). CIFAR and STL-10 are not opened (their sizes are in the
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


def _spread(items: list[str], n: int) -> list[str]:
    """Up to `n` of `items`, evenly spaced from the first to the last."""
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else items[:1]


def check_decodable(fs: AbstractFileSystem, folder: str, classes: list[str], field_name: str) -> None:
    """Raise DatasetNotFoundError (naming the field, the folder and how many files were tried) unless one of up
    to DECODE_SAMPLE image files, spread over the class folders and within each, decodes."""
    picked = _spread(classes, DECODE_SAMPLE)
    per_class = -(-DECODE_SAMPLE // len(picked))
    tried, last_error = 0, ""
    for name in picked:
        files = sorted(p for p in fs.find(posixpath.join(folder, name)) if p.lower().endswith(IMAGE_EXTENSIONS))
        for path in _spread(files, min(per_class, DECODE_SAMPLE - tried)):
            tried += 1
            try:
                decode_image(read_bytes(fs, path), display(fs, path))
                return
            except (CorruptImageError, OSError) as err:
                last_error = str(err)
        if tried >= DECODE_SAMPLE:
            break
    if tried:
        raise DatasetNotFoundError(f"{field_name}: none of the {tried} image files tried in {display(fs, folder)} "
                                   f"(spread over its class folders) decodes as an image; the last: {last_error}")


def _peek_folders(root: str, val_root: str | None, enough: int) -> tuple[int, int]:
    from .external import imagefolder_layout

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
    check_decodable(layout.fs, layout.train_dir, classes, "data.root")
    check_decodable(layout.fs_val, layout.val_dir, find_classes(layout.fs_val, layout.val_dir), layout.val_field)
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
        names = meta.schema.to_arrow_schema().names
        if "image" not in names:  # read only by the workers, where a missing column would fail every worker
            raise ValueError(f"data.root: Parquet shard {display(fs, shard)} has no 'image' column of encoded "
                             f"images (columns: {', '.join(names)})")
        images += meta.num_rows
        if classes is None:
            names = classes_from_metadata(meta.schema.to_arrow_schema().metadata)
            classes = len(names) if names else None
        if images >= enough:
            break
    if images == 0:
        raise DatasetNotFoundError(f"data.root: the Parquet shards under {root} hold no images")
    return images, classes
