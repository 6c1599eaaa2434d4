"""Dataset records for run tracking: which data, where, how many images, and a content digest cheap to compute.

The digest changes when the data does, without reading any image: sorted file names and sizes for image
folders and binary files, the footers (row counts, row groups, schema and its metadata) of Parquet
shards, and the generator's parameters for the embedded sets (for the digits, also a hash of the 1,797
source digits). A training split capped by `data.max_images` has that cap in its digest: it is other data.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from .files import IMAGE_EXTENSIONS, display, find_classes

if TYPE_CHECKING:
    from ..config import DataConfig
    from ..config.detect import DetectDataConfig

DIGEST_CHARS = 16
JSON_HEAD_BYTES = 1 << 20  # a COCO instances file is hashed by its size and first MiB, not read whole
CIFAR_IMAGES = {"train": 50_000, "val": 10_000}  # both CIFARs: 5 x 10,000 (or one 50,000) train, 10,000 test
STL10_IMAGE_BYTES = 3 * 96 * 96


@dataclass
class DatasetRecord:
    """One split of a dataset as a run's input."""

    name: str  # "<data.name>/<split>"
    split: str  # "train" | "val"
    source: str  # root path or URL, or the generating function of an embedded set
    source_type: str  # "local", the URL's scheme ("s3", "gs", ...), or "code" for embedded sets
    num_images: int
    digest: str
    profile: dict[str, Any] = field(default_factory=dict)  # what was counted and hashed, for people


def digest_of(parts: Any) -> str:
    """A short sha256 of a JSON-able description."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:DIGEST_CHARS]


def _source_type(fs: AbstractFileSystem) -> str:
    if isinstance(fs, LocalFileSystem):
        return "local"
    protocol = fs.protocol
    return protocol if isinstance(protocol, str) else protocol[0]


# ---------------------------------------------------------------------------------------------------
# Per kind: (num_images, what the digest covers, source, source_type) for each split


def _sized_files(fs: AbstractFileSystem, paths: list[str], base: str) -> list[tuple[str, int]]:
    return sorted((posixpath.relpath(p, base), int(fs.size(p))) for p in paths)


def _imagefolder_split(fs: AbstractFileSystem, folder: str) -> tuple[int, list, str, str]:
    """Every image file under `folder/<class>/` (what ImageFolderFS reads) by relative path and size."""
    entries = []
    for name in find_classes(fs, folder):
        found = fs.find(posixpath.join(folder, name), detail=True)
        entries += [(posixpath.relpath(p, folder), int(info.get("size") or 0)) for p, info in found.items()
                    if p.lower().endswith(IMAGE_EXTENSIONS)]
    entries.sort()
    return len(entries), entries, display(fs, folder), _source_type(fs)


def _parquet_split(fs: AbstractFileSystem, shards: list[str]) -> tuple[int, list, str, str]:
    """Each shard's footer: rows, row groups and their sizes, schema and its key-value metadata."""
    import pyarrow.parquet as pq

    entries, rows = [], 0
    for shard in shards:
        with fs.open(shard, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        groups = [(meta.row_group(i).num_rows, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]
        kv = {k.decode(errors="replace"): hashlib.sha256(v).hexdigest()[:DIGEST_CHARS]
              for k, v in (meta.metadata or {}).items()}
        schema = meta.schema.to_arrow_schema().to_string(show_schema_metadata=False)
        entries.append((posixpath.basename(shard), int(fs.size(shard)), meta.num_rows, groups, schema, kv))
        rows += meta.num_rows
    base = posixpath.dirname(shards[0]) if len(shards) > 1 else shards[0]
    return rows, entries, display(fs, base), _source_type(fs)


def _binary_split(name: str, fs: AbstractFileSystem, files: list[str], split: str) -> tuple[int, list, str, str]:
    folder = posixpath.dirname(files[0])
    entries = _sized_files(fs, files, folder)
    if name == "stl10":
        count = next(size for path, size in entries if path.endswith("_X.bin")) // STL10_IMAGE_BYTES
    else:
        count = CIFAR_IMAGES[split]
    return count, entries, display(fs, folder), _source_type(fs)


def _digits_splits(name: str) -> dict[str, tuple[int, list, str, str]]:
    from .digits import generator_parameters

    train, val, params = generator_parameters(name)
    generator = "mocoray.data.digits." + ("scattered_digits" if name == "scattered-digits" else "plain_digits")
    return {split: (count, [split, params], generator, "code") for split, count in (("train", train), ("val", val))}


def _synthetic_splits(cfg: DataConfig) -> dict[str, tuple[int, list, str, str]]:
    generator = "mocoray.data.synthetic.synthetic_images"
    out = {}
    for split, n, seed in (("train", cfg.synthetic_images, 0), ("val", max(8, cfg.synthetic_images // 4), 1)):
        params = {"num_images": n, "num_classes": cfg.synthetic_classes, "size": cfg.image_size, "seed": seed}
        out[split] = (n, [params], generator, "code")
    return out


def _splits(cfg: DataConfig, pretraining: bool) -> dict[str, tuple[int, list, str, str]]:
    name = cfg.name
    if name in ("scattered-digits", "digits"):
        return _digits_splits(name)
    if name == "synthetic":
        return _synthetic_splits(cfg)
    from .external import binary_split_files, imagefolder_layout, parquet_shards

    if name == "imagefolder":
        layout = imagefolder_layout(cfg.root, cfg.val_root)  # type: ignore[arg-type]
        fs, train_dir, fs_val, val_dir = layout.fs, layout.train_dir, layout.fs_val, layout.val_dir
        return {"train": _imagefolder_split(fs, train_dir), "val": _imagefolder_split(fs_val, val_dir)}
    if name == "parquet":
        fs, train, fs_val, val = parquet_shards(cfg.root, cfg.val_root)  # type: ignore[arg-type]
        return {"train": _parquet_split(fs, train), "val": _parquet_split(fs_val, val)}
    fs, files = binary_split_files(name, cfg.root)  # type: ignore[arg-type]
    out = {split: _binary_split(name, fs, files[split], split) for split in ("train", "val")}
    if name == "stl10" and pretraining:  # pretraining reads the unlabeled images too (see build_pretrain_data)
        count, entries, source, kind = out["train"]
        extra_count, extra, _source, _kind = _binary_split(name, fs, files["unlabeled"], "unlabeled")
        out["train"] = (count + extra_count, entries + extra, source, kind)
    return out


def dataset_records(cfg: DataConfig, pretraining: bool = False) -> list[DatasetRecord]:
    """The train and val splits a job reads, as records (the train split of pretraining on STL-10
    includes the unlabeled images; `data.max_images` caps the train split)."""
    return _as_records(cfg.name, _splits(cfg, pretraining), {"train": cfg.max_images})


def _as_records(name: str, splits: dict[str, tuple[int, list, str, str]], caps: dict[str, int | None]
                ) -> list[DatasetRecord]:
    """Records of `splits` (see `_splits`); a split capped below its size (`caps`) has the cap in its digest."""
    records = []
    for split, (count, covered, source, source_type) in splits.items():
        cap = caps.get(split)
        profile: dict[str, Any] = {"num_images": count}
        if cap is not None and cap < count:
            profile = {"num_images": cap, "max_images": cap, "images_available": count}
            covered = [covered, {"max_images": cap}]
        records.append(DatasetRecord(name=f"{name}/{split}", split=split, source=source, source_type=source_type,
                                     num_images=profile["num_images"], digest=digest_of([name, covered]),
                                     profile=profile))
    return records


# ---------------------------------------------------------------------------------------------------
# Detection datasets


def _voc_split(root: str, sets: list[str], field: str) -> tuple[int, list, str, str]:
    """The image ids of each VOC set (from its split file; annotations are not read)."""
    from .detection.voc import voc_split_ids
    from .files import resolve

    fs, _base = resolve(root, field)
    lists = voc_split_ids(root, sets, field)
    covered = [(year, split, len(ids), digest_of(ids)) for year, split, ids in lists]
    return sum(len(ids) for _y, _s, ids in lists), covered, root, _source_type(fs)


def _coco_split(images: str, annotations: str, field: str) -> tuple[int, list, str, str]:
    """The image files (names and sizes) and the instances file's size and first MiB."""
    from .files import resolve

    fs, folder = resolve(images, field)
    found = fs.find(folder, detail=True)
    files = sorted((posixpath.relpath(p, folder), int(info.get("size") or 0)) for p, info in found.items()
                   if p.lower().endswith(IMAGE_EXTENSIONS))
    fs_json, path = resolve(annotations, field.replace("root", "annotations"))
    with fs_json.open(path, "rb") as f:
        head = hashlib.sha256(f.read(JSON_HEAD_BYTES)).hexdigest()[:DIGEST_CHARS]
    return len(files), [files, posixpath.basename(path), int(fs_json.size(path)), head], images, _source_type(fs)


def detection_records(cfg: DetectDataConfig) -> list[DatasetRecord]:
    """The train and val splits of a detection job, as records (see `dataset_records`)."""
    if cfg.name == "voc":
        splits = {"train": _voc_split(cfg.root, cfg.train_sets, "data.root"),  # type: ignore[arg-type]
                  "val": _voc_split(cfg.val_root or cfg.root, cfg.val_sets,  # type: ignore[arg-type]
                                    "data.val_root" if cfg.val_root else "data.root")}
    elif cfg.name == "coco":
        splits = {"train": _coco_split(cfg.root, cfg.annotations, "data.root"),  # type: ignore[arg-type]
                  "val": _coco_split(cfg.val_root, cfg.val_annotations, "data.val_root")}  # type: ignore[arg-type]
    else:
        params = {"canvas_size": cfg.canvas_size, "max_digits": cfg.max_digits}
        generator = "mocoray.data.detection.digits.scattered_digits_det"
        splits = {split: (n, [split, n, params], generator, "code")
                  for split, n in (("train", cfg.train_canvases), ("val", cfg.val_canvases))}
    return _as_records(cfg.name, splits, {"train": cfg.max_images, "val": cfg.max_val_images})
