"""Images in Parquet shards through fsspec: ImageFolder -> shards conversion, and the shard reader."""

from __future__ import annotations

import json
import logging
import os
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from PIL import Image
from torch.utils.data import Dataset

from .base import CorruptImageError, DatasetNotFoundError
from .files import decode_image, display, find_classes, list_images, resolve

log = logging.getLogger(__name__)
CLASSES_KEY = b"mocoray.classes"


def classes_from_metadata(metadata: dict[bytes, bytes] | None) -> list[str] | None:
    """Class names written by `write_parquet_shards`, or by HuggingFace `datasets` (a ClassLabel `label`)."""
    if not metadata:
        return None
    if CLASSES_KEY in metadata:
        return list(json.loads(metadata[CLASSES_KEY]))
    try:
        label = json.loads(metadata[b"huggingface"])["info"]["features"]["label"]
        return list(label["names"]) if label.get("_type") == "ClassLabel" else None
    except (KeyError, TypeError, ValueError):
        return None


def _image_bytes(column: pa.ChunkedArray, where: str) -> pa.Array:
    """The `image` column as one binary array; HuggingFace writes a struct {bytes, path}."""
    if pa.types.is_struct(column.type):
        if column.type.get_field_index("bytes") < 0:
            raise ValueError(f"{where}: column 'image' is a struct without a 'bytes' field ({column.type})")
        column = pa.chunked_array(
            [chunk.field("bytes") for chunk in column.chunks], type=column.type.field("bytes").type
        )
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise ValueError(f"{where}: column 'image' must hold encoded image bytes, got {column.type}")
    # large_binary: one shard may exceed binary's 2 GiB offset limit once its chunks are combined.
    return column.cast(pa.large_binary()).combine_chunks()


class ParquetImages(Dataset):
    """`(PIL RGB image, label)` from Parquet shards: encoded bytes held in memory, decoded per item.

    Items keep the shards' order. A missing `label` column or a null label reads as -1."""

    def __init__(self, fs: AbstractFileSystem, shards: Sequence[str], num_classes: int | None = None) -> None:
        self.shards = [display(fs, s) for s in shards]
        self._images: list[pa.Array] = []
        labels, self.classes = [], None
        for shard, name in zip(shards, self.shards, strict=True):
            with fs.open(shard, "rb") as f:
                schema = pq.read_schema(f)
                if "image" not in schema.names:
                    raise ValueError(f"{name}: no 'image' column (columns: {schema.names})")
                columns = ["image"] + (["label"] if "label" in schema.names else [])
                f.seek(0)
                table = pq.read_table(f, columns=columns)
            self._images.append(_image_bytes(table.column("image"), name))
            if "label" in columns:
                labels.append(pc.fill_null(table.column("label"), -1).to_numpy().astype(np.int64))
            else:
                labels.append(np.full(table.num_rows, -1, dtype=np.int64))
            shard_classes = classes_from_metadata(schema.metadata)
            if self.classes is None:
                self.classes = shard_classes
            elif shard_classes is not None and shard_classes != self.classes:
                raise ValueError(f"{name}: class names differ from those of {self.shards[0]}")
        self.labels = torch.from_numpy(np.concatenate(labels)) if labels else torch.empty(0, dtype=torch.long)
        # offsets[s] = index of shard s's first row: item -> (shard, row) by binary search
        self._offsets = np.cumsum([0] + [len(a) for a in self._images])
        if len(self) == 0:
            raise DatasetNotFoundError(f"{self.shards[0]}: the Parquet shards hold no rows")
        if num_classes is None:
            max_label = int(self.labels.max()) if len(self.labels) else -1
            num_classes = len(self.classes) if self.classes else max_label + 1
        self.num_classes = num_classes

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(shard index, row in shard) of item `i`."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        shard = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return shard, i - int(self._offsets[shard])

    def encoded(self, i: int) -> tuple[bytes, int]:
        """The row's image bytes, undecoded, and its label (what `data.decode=gpu` loader workers serve)."""
        shard, row = self.locate(i)
        data = self._images[shard][row].as_py()
        if data is None:
            raise CorruptImageError(f"{self.shards[shard]} row {row}: no image bytes (null)")
        return data, int(self.labels[i])

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        data, label = self.encoded(i)
        shard, row = self.locate(i)
        return decode_image(data, f"{self.shards[shard]} row {row}"), label


@dataclass
class ShardWriteReport:
    """What `convert_image_folder` wrote, and what it skipped."""

    shards: list[str]
    images: int
    classes: list[str]
    not_images: list[str] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)  # "path: reason"


def _read_checked(fs: AbstractFileSystem, path: str) -> tuple[bytes | None, str | None]:
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        decode_image(data, path)
    except CorruptImageError as err:
        return None, str(err)
    return data, None


def convert_image_folder(
    image_folder: str,
    out_dir: str,
    images_per_shard: int = 1000,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
    threads: int = 8,
) -> ShardWriteReport:
    """Write `image_folder/[split/]<class>/*` as Parquet shards `out_dir/[split/]<split or part>-NNNNN.parquet`.

    Columns: `image` (the original file bytes), `label` (int32 index into the sorted class folder
    names), `path` (relative to the split folder); the class names are in the schema metadata under
    `mocoray.classes` (JSON). The class index is `classes` if given; else, for a split other than
    `train`, that of a sibling `train` folder when there is one (so val labels match train's); else the
    folder's own sorted class folders. Files that are not images or do not decode are skipped and listed
    in the report. `threads` read and check files in parallel (decoding releases the GIL; remote reads wait).
    """
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
    fs_in, src = resolve(image_folder, "image_folder")
    if split:
        src = posixpath.join(src, split)
        if not fs_in.isdir(src):
            raise DatasetNotFoundError(
                f"image_folder: {display(fs_in, src)} does not exist (split={split!r})"
            )
    if classes is None:
        train_dir = posixpath.join(posixpath.dirname(src.rstrip("/")), "train")
        use_train = split is not None and split != "train" and fs_in.isdir(train_dir)
        classes = find_classes(fs_in, train_dir if use_train else src)
    classes = list(classes)
    if not classes:
        raise ValueError(f"image_folder: no class sub-folders in {display(fs_in, src)}")
    paths, labels, not_images = list_images(
        fs_in, src, {c: i for i, c in enumerate(classes)}, display(fs_in, src)
    )

    fs_out, out = url_to_fs(out_dir if "://" in out_dir else os.path.expanduser(out_dir))
    if split:
        out = posixpath.join(out, split)
    prefix = split or "part"
    stale = fs_out.glob(posixpath.join(out, f"{prefix}-*.parquet")) if fs_out.exists(out) else []
    if stale and not overwrite:
        raise FileExistsError(
            f"{display(fs_out, out)} already holds {len(stale)} {prefix}-*.parquet shards (overwrite=True replaces them)"
        )
    for p in stale:
        fs_out.rm(p)
    fs_out.makedirs(out, exist_ok=True)

    schema = pa.schema(
        [("image", pa.binary()), ("label", pa.int32()), ("path", pa.string())],
        metadata={CLASSES_KEY: json.dumps(classes).encode()},
    )
    report = ShardWriteReport(
        shards=[], images=0, classes=classes, not_images=[display(fs_in, p) for p in not_images]
    )
    pending: dict[str, list] = {"image": [], "label": [], "path": []}

    def flush() -> None:
        shard = posixpath.join(out, f"{prefix}-{len(report.shards):05d}.parquet")
        with fs_out.open(shard, "wb") as f:
            pq.write_table(pa.table(pending, schema=schema), f)
        report.shards.append(display(fs_out, shard))
        report.images += len(pending["image"])
        for column in pending.values():
            column.clear()

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        # one window at a time: Executor.map submits everything at once and would hold all bytes in memory
        for start in range(0, len(paths), images_per_shard):
            window = paths[start : start + images_per_shard]
            for path, label, (data, error) in zip(
                window,
                labels[start : start + images_per_shard],
                pool.map(lambda p: _read_checked(fs_in, p), window),
                strict=True,
            ):
                if error is not None:
                    report.undecodable.append(error)
                    continue
                pending["image"].append(data)
                pending["label"].append(label)
                pending["path"].append(posixpath.relpath(path, src))
                if len(pending["image"]) == images_per_shard:
                    flush()
    if pending["image"]:
        flush()
    if not report.shards:
        raise ValueError(f"image_folder: no readable images under {display(fs_in, src)}")
    if report.not_images or report.undecodable:
        log.warning(
            "%s: skipped %d files that are not images and %d undecodable images (first: %s)",
            display(fs_in, src),
            len(report.not_images),
            len(report.undecodable),
            (report.not_images + report.undecodable)[:3],
        )
    log.info("wrote %d images in %d shards to %s", report.images, len(report.shards), display(fs_out, out))
    return report


def write_parquet_shards(
    image_folder: str, out_dir: str, images_per_shard: int = 1000, split: str | None = None
) -> list[str]:
    """Convert an ImageFolder-layout folder into Parquet shards; returns the shard paths/URLs.

    See `convert_image_folder` for the format, the class index and the skipped-file report."""
    return convert_image_folder(image_folder, out_dir, images_per_shard, split).shards
