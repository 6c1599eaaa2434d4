"""Datasets read from disk or a URL: CIFAR-10/100, STL-10, ImageFolder (ImageNet layout) and Parquet shards.

`external_splits(cfg)` returns the labelled `(train, val, num_classes)` for `cfg.name`. Paths go
through fsspec, so `data.root` / `data.val_root` may be local paths or URLs (`file://`, `memory://`,
`s3://` when s3fs is installed). A path that is not there raises `DatasetNotFoundError` naming the
config field and the exact path looked for.

STL-10: `external_splits` returns the labelled `train` (5,000) and `test` (8,000) splits, which is what
the kNN monitor and the linear protocol need. The 100,000 `unlabeled` images, which MoCo-style
pretraining on STL-10 normally adds to `train`, come from `stl10_unlabeled(root)` (memory-mapped for
local files, labels -1); a job that wants them concatenates them with the labelled train split itself.
"""

from __future__ import annotations

import pickle
import posixpath
import re
from typing import TYPE_CHECKING

import numpy as np
import torch
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from torch.utils.data import Dataset

from .base import CorruptImageError, DatasetNotFoundError, TensorImages
from .files import (
    IMAGE_EXTENSIONS,
    decode_image,
    display,
    find_classes,
    find_shards,
    list_images,
    read_bytes,
    resolve,
)

if TYPE_CHECKING:  # neither pydantic (config) nor pyarrow (parquet) is needed for the other formats
    from ..config import DataConfig
    from .parquet import ParquetImages

CIFAR = {
    # name: (folder of the extracted torchvision archive, train files, test files, label key,
    #        meta file, class names key)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        "batches.meta",
        "label_names",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "meta", "fine_label_names"),
}
STL10_FOLDER = "stl10_binary"
STL10_SIZE = 96


def external_splits(cfg: DataConfig) -> tuple[Dataset, Dataset, int]:
    """(train, val, num_classes) labelled datasets for the on-disk datasets named by `cfg.name`."""
    if cfg.name in CIFAR:
        return cifar_splits(cfg.name, cfg.root)
    if cfg.name == "stl10":
        return stl10_splits(cfg.root)
    if cfg.name == "imagefolder":
        return imagefolder_splits(cfg.root, cfg.val_root)
    if cfg.name == "parquet":
        return parquet_splits(cfg.root, cfg.val_root)
    raise ValueError(f"data.name={cfg.name!r} is not an external dataset")


def _find_folder(fs: AbstractFileSystem, root: str, url: str, folder: str, marker: str) -> str:
    """`root/folder` if it exists, else `root` itself when it already is that folder (holds `marker`)."""
    inner = posixpath.join(root, folder)
    if fs.isdir(inner):
        return inner
    if fs.exists(posixpath.join(root, marker)):
        return root
    raise DatasetNotFoundError(
        f"data.root: {url}/{folder} does not exist (expected the extracted torchvision archive, "
        f"e.g. {url}/{folder}/{marker}; data.root may also be that folder itself)"
    )


def _require_file(fs: AbstractFileSystem, path: str) -> str:
    if not fs.isfile(path):
        raise DatasetNotFoundError(
            f"data.root: {display(fs, path)} does not exist (incomplete dataset folder?)"
        )
    return path


# ---------------------------------------------------------------------------------------------- CIFAR


def _load_cifar_pickle(fs: AbstractFileSystem, path: str) -> dict:
    # The batches are pickles (this is the format's only distribution); load only data you trust.
    # latin1 reads both the original Python 2 pickles (str keys, numpy arrays) and Python 3 ones.
    with fs.open(_require_file(fs, path), "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _cifar_split(
    fs: AbstractFileSystem, folder: str, files: list[str], label_key: str, num_classes: int
) -> TensorImages:
    images, labels = [], []
    for name in files:
        entry = _load_cifar_pickle(fs, posixpath.join(folder, name))
        # each row is the R, G and B planes of one image, so N x 3072 reshapes straight to N x 3 x 32 x 32
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[label_key])
    return TensorImages(
        torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long), num_classes
    )


def cifar_splits(name: str, root: str) -> tuple[TensorImages, TensorImages, int]:
    """CIFAR-10/100 in torchvision's python format: (train split, test split, classes) as uint8 tensors."""
    folder_name, train_files, test_files, label_key, meta_file, names_key = CIFAR[name]
    fs, path = resolve(root, "data.root")
    folder = _find_folder(fs, path, root, folder_name, train_files[0])
    num_classes = 10 if name == "cifar10" else 100
    train = _cifar_split(fs, folder, train_files, label_key, num_classes)
    test = _cifar_split(fs, folder, test_files, label_key, num_classes)
    meta = posixpath.join(folder, meta_file)
    if fs.isfile(meta):
        train.classes = test.classes = list(_load_cifar_pickle(fs, meta)[names_key])
    return train, test, num_classes


# ---------------------------------------------------------------------------------------------- STL-10


def _stl10_images(fs: AbstractFileSystem, path: str, memmap: bool = False) -> torch.Tensor:
    """uint8 N x 3 x 96 x 96 from an STL-10 `*_X.bin` file (each image is stored column-major)."""
    _require_file(fs, path)
    if memmap and isinstance(fs, LocalFileSystem):
        # copy-on-write mapping: pages load on access (the unlabeled split is 2.7 GB), and the array is
        # writable, which torch.from_numpy wants
        flat = np.memmap(path, dtype=np.uint8, mode="c")
    else:
        flat = np.frombuffer(bytearray(read_bytes(fs, path)), dtype=np.uint8)
    images = flat.reshape(-1, 3, STL10_SIZE, STL10_SIZE)
    return torch.from_numpy(images).transpose(2, 3)  # column-major -> H x W; a view, no copy


def _stl10_folder(root: str) -> tuple[AbstractFileSystem, str]:
    fs, path = resolve(root, "data.root")
    return fs, _find_folder(fs, path, root, STL10_FOLDER, "train_X.bin")


def _stl10_split(fs: AbstractFileSystem, folder: str, split: str) -> TensorImages:
    images = _stl10_images(fs, posixpath.join(folder, f"{split}_X.bin")).contiguous()
    raw = np.frombuffer(
        read_bytes(fs, _require_file(fs, posixpath.join(folder, f"{split}_y.bin"))), dtype=np.uint8
    )
    labels = torch.from_numpy(raw.astype(np.int64) - 1)  # the file counts classes from 1
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{display(fs, folder)}: {split}_X.bin has {images.shape[0]} images but {split}_y.bin {labels.shape[0]} labels"
        )
    ds = TensorImages(images, labels, num_classes=10)
    names = posixpath.join(folder, "class_names.txt")
    if fs.isfile(names):
        ds.classes = read_bytes(fs, names).decode().split()
    return ds


def stl10_splits(root: str) -> tuple[TensorImages, TensorImages, int]:
    """STL-10 binary format: (labelled train split, test split, 10) as uint8 96x96 tensors."""
    fs, folder = _stl10_folder(root)
    return _stl10_split(fs, folder, "train"), _stl10_split(fs, folder, "test"), 10


def stl10_unlabeled(root: str) -> TensorImages:
    """STL-10's 100,000 unlabeled images (labels -1) for pretraining; memory-mapped when local."""
    fs, folder = _stl10_folder(root)
    images = _stl10_images(fs, posixpath.join(folder, "unlabeled_X.bin"), memmap=True)
    return TensorImages(images, torch.full((images.shape[0],), -1, dtype=torch.long), num_classes=10)


def binary_split_files(name: str, root: str) -> tuple[AbstractFileSystem, dict[str, list[str]]]:
    """The files each split of CIFAR / STL-10 reads: {"train": [...], "val": [...], "unlabeled": [...]}."""
    if name in CIFAR:
        folder_name, train_files, test_files = CIFAR[name][:3]
        fs, path = resolve(root, "data.root")
        folder = _find_folder(fs, path, root, folder_name, train_files[0])
        return fs, {"train": [posixpath.join(folder, f) for f in train_files],
                    "val": [posixpath.join(folder, f) for f in test_files]}
    if name == "stl10":
        fs, folder = _stl10_folder(root)
        return fs, {split: [posixpath.join(folder, f"{prefix}_{part}.bin") for part in parts]
                    for split, prefix, parts in (("train", "train", "Xy"), ("val", "test", "Xy"),
                                                 ("unlabeled", "unlabeled", "X"))}
    raise ValueError(f"data.name={name!r} is not a binary-file dataset (cifar10, cifar100, stl10)")


# ---------------------------------------------------------------------------------------------- ImageFolder


class ImageFolderFS(Dataset):
    """`(PIL RGB image, label)` from `folder/<class>/*`, decoded lazily through fsspec.

    Like torchvision's ImageFolder (same extensions, sorted class folders), but any fsspec URL works,
    the class index can be imposed (a val split uses train's), and an undecodable file raises
    `CorruptImageError` naming it (so `SkipCorrupt` can skip and count it)."""

    def __init__(
        self,
        fs: AbstractFileSystem,
        folder: str,
        classes: list[str] | None = None,
        field_name: str = "data.root",
    ) -> None:
        self.fs, self.root = fs, display(fs, folder)
        self.classes = list(classes) if classes is not None else find_classes(fs, folder)
        if not self.classes:
            raise DatasetNotFoundError(
                f"{field_name}: no class sub-folders in {self.root} (expected {self.root}/<class>/<image>)"
            )
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.paths, labels, others = list_images(fs, folder, self.class_to_idx, f"{field_name}: {self.root}")
        if not self.paths:
            raise DatasetNotFoundError(
                f"{field_name}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {self.root}"
            )
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.num_classes = len(self.classes)
        self.ignored_files = len(others)  # files without an image extension (READMEs, .DS_Store, ...)

    def __len__(self) -> int:
        return len(self.paths)

    def encoded(self, i: int) -> tuple[bytes, int]:
        """The file's bytes, undecoded, and its label (what `data.decode=gpu` loader workers serve)."""
        try:
            return read_bytes(self.fs, self.paths[i]), int(self.labels[i])
        except (FileNotFoundError, PermissionError) as err:  # gone/unreadable since listing: skip it too
            raise CorruptImageError(f"{display(self.fs, self.paths[i])}: {type(err).__name__}: {err}") from err

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        data, label = self.encoded(i)
        return decode_image(data, display(self.fs, self.paths[i])), label


def imagefolder_dirs(root: str, val_root: str | None = None
                    ) -> tuple[tuple[AbstractFileSystem, str], tuple[AbstractFileSystem, str, str]]:
    """((fs, train folder), (fs, val folder, its config field)) of an ImageFolder dataset, checked to exist."""
    fs, path = resolve(root, "data.root")
    train_dir = posixpath.join(path, "train")
    if not fs.isdir(train_dir):
        if val_root is None:
            raise DatasetNotFoundError(
                f"data.root: {root}/train does not exist: expected the ImageNet layout {root}/train/<class>/* "
                f"and {root}/val/<class>/*, or set data.val_root and point data.root at the train folder"
            )
        train_dir = path
    # check the val path before listing train: listing ImageNet's train split takes a while
    if val_root is not None:
        fs_val, val_dir = resolve(val_root, "data.val_root")
        field_name = "data.val_root"
    else:
        fs_val, val_dir, field_name = fs, posixpath.join(path, "val"), "data.root"
        if not fs.isdir(val_dir):
            raise DatasetNotFoundError(
                f"data.val_root is not set and {root}/val does not exist (data.root={root})"
            )
    return (fs, train_dir), (fs_val, val_dir, field_name)


def imagefolder_splits(root: str, val_root: str | None = None) -> tuple[ImageFolderFS, ImageFolderFS, int]:
    """ImageNet layout `root/train/<class>/*` + `root/val/<class>/*` (or `val_root/<class>/*`).

    With `val_root` given, `root` may also be the train folder itself. Val is labelled with train's
    class index; a val class folder unknown to train is an error."""
    (fs, train_dir), (fs_val, val_dir, field_name) = imagefolder_dirs(root, val_root)
    train = ImageFolderFS(fs, train_dir, field_name="data.root")
    val = ImageFolderFS(fs_val, val_dir, classes=train.classes, field_name=field_name)
    return train, val, train.num_classes


# ---------------------------------------------------------------------------------------------- Parquet

_SPLIT_NAME = re.compile(r"^(train|val|validation|test)[-_.]")
_VAL_NAMES = ("val", "validation", "test")  # first found is the labelled eval split


def _parquet_layout(fs: AbstractFileSystem, path: str, url: str) -> tuple[list[str], list[str] | None]:
    """(train shards, val shards or None): `path/train` + `path/val` folders, or HuggingFace-style
    `train-*.parquet` + `validation-*.parquet` names, or (no split found) everything is train."""
    if fs.isdir(path):
        if fs.isdir(posixpath.join(path, "train")):
            train = find_shards(fs, posixpath.join(path, "train"), f"{url}/train", "data.root")
            for name in _VAL_NAMES:
                if fs.isdir(posixpath.join(path, name)):
                    return train, find_shards(fs, posixpath.join(path, name), f"{url}/{name}", "data.root")
            return train, None
        shards = find_shards(fs, path, url, "data.root")
        by_split: dict[str, list[str]] = {}
        for s in shards:
            m = _SPLIT_NAME.match(posixpath.basename(s))
            by_split.setdefault(m.group(1) if m else "", []).append(s)
        val_name = next((n for n in _VAL_NAMES if n in by_split), None)
        if "train" in by_split and val_name:
            return by_split["train"], by_split[val_name]
        return shards, None
    return find_shards(fs, path, url, "data.root"), None


def parquet_shards(root: str, val_root: str | None = None
                   ) -> tuple[tuple[AbstractFileSystem, list[str]], tuple[AbstractFileSystem, list[str]]]:
    """((fs, train shards), (fs, val shards)) of a Parquet dataset; see `parquet_splits` for the layouts."""
    fs, path = resolve(root, "data.root")
    train_shards, val_shards = _parquet_layout(fs, path, root)
    # find the val shards before reading train into memory, so a missing val split fails fast
    if val_root is not None:
        fs_val, val_path = resolve(val_root, "data.val_root")
        val_shards = find_shards(fs_val, val_path, val_root, "data.val_root")
    elif val_shards is not None:
        fs_val = fs
    else:
        raise DatasetNotFoundError(
            f"data.val_root is not set and data.root={root} has no labelled val split: expected {root}/train + "
            f"{root}/val sub-folders (or train-*/validation-* shard names), or set data.val_root"
        )
    return (fs, train_shards), (fs_val, val_shards)


def parquet_splits(root: str, val_root: str | None = None) -> tuple[ParquetImages, ParquetImages, int]:
    """Parquet shards of encoded images + optional `label`: (train, val, num_classes).

    `root` is a shard, a glob or a folder; val is `val_root`, else `root/val` (or `validation`, `test`)
    next to `root/train`, else `validation-*`/`val-*`/`test-*` shards next to `train-*` ones."""
    from .parquet import ParquetImages

    (fs, train_shards), (fs_val, val_shards) = parquet_shards(root, val_root)
    train, val = ParquetImages(fs, train_shards), ParquetImages(fs_val, val_shards)
    if train.classes is not None and val.classes is not None and train.classes != val.classes:
        raise ValueError(
            f"the train shards ({train.shards[0]}) and val shards ({val.shards[0]}) name different classes"
        )
    num_classes = max(train.num_classes, val.num_classes)
    train.num_classes = val.num_classes = num_classes
    return train, val, num_classes
