"""Image files through fsspec: paths and URLs, class folders, shard lists, and decoding with PIL.

Needs only fsspec and PIL (no pyarrow), so the ImageFolder path works where pyarrow is not installed.
"""

from __future__ import annotations

import io
import os
import posixpath

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from .base import CorruptImageError, DatasetNotFoundError

# The same list torchvision's ImageFolder accepts, so a folder means the same thing to both.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def has_magic(path: str) -> bool:
    """Whether `path` is a glob pattern."""
    return any(c in path for c in "*?[")


def decode_image(data: bytes | None, where: str) -> Image.Image:
    """Encoded bytes -> PIL RGB image; any decoding failure becomes `CorruptImageError(where: reason)`."""
    if data is None:
        raise CorruptImageError(f"{where}: no image bytes (null)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode fully now: a truncated file must fail here, not later inside a transform
            return img.convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ... for bad data
        raise CorruptImageError(f"{where}: {type(err).__name__}: {err}") from err


def resolve(url: str, field_name: str) -> tuple[AbstractFileSystem, str]:
    """(filesystem, path) for a local path or URL that must exist, else `DatasetNotFoundError` naming the field."""
    fs, path = url_to_fs(url if "://" in url else os.path.expanduser(url))
    if not has_magic(path) and not fs.exists(path):
        raise DatasetNotFoundError(f"{field_name}: {url} does not exist")
    return fs, path


def display(fs: AbstractFileSystem, path: str) -> str:
    """A path as the user would write it: plain for local files, a URL otherwise."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _is_dir(entry: dict) -> bool:
    return entry.get("type") == "directory"


def find_classes(fs: AbstractFileSystem, folder: str) -> list[str]:
    """Sorted names of the class sub-folders of `folder` (hidden folders ignored)."""
    names = [posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(folder, detail=True) if _is_dir(e)]
    return sorted(n for n in names if not n.startswith("."))


def list_images(
    fs: AbstractFileSystem, folder: str, class_to_idx: dict[str, int], where: str
) -> tuple[list[str], list[int], list[str]]:
    """(image paths, labels, other files) under `folder/<class>/`, sorted by class then path.

    Every class folder must be in `class_to_idx` (a val split labelled with the train split's index
    would silently mislabel otherwise)."""
    present = find_classes(fs, folder)
    unknown = [c for c in present if c not in class_to_idx]
    if unknown:
        raise ValueError(
            f"{where}: class folders {unknown[:10]} are not among the {len(class_to_idx)} known classes"
        )
    paths, labels, others = [], [], []
    for name in present:
        for p in sorted(fs.find(posixpath.join(folder, name))):
            if p.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(p)
                labels.append(class_to_idx[name])
            else:
                others.append(p)
    return paths, labels, others


def find_shards(fs: AbstractFileSystem, path: str, url: str, field_name: str) -> list[str]:
    """Parquet files named by `path`: one file, a glob, or every `*.parquet` under a folder."""
    if has_magic(path):
        shards = sorted(p for p in fs.glob(path) if fs.isfile(p))
        if not shards:
            raise DatasetNotFoundError(f"{field_name}: {url} matches no files")
        return shards
    if fs.isfile(path):
        return [path]
    # Spark/Hive write _SUCCESS, _metadata and .crc files next to the shards: not data.
    shards = sorted(
        p
        for p in fs.find(path)
        if p.endswith(".parquet") and not posixpath.basename(p).startswith(("_", "."))
    )
    if not shards:
        raise DatasetNotFoundError(f"{field_name}: no Parquet shards (*.parquet) under {url}")
    return shards


def read_bytes(fs: AbstractFileSystem, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


def image_size(fs: AbstractFileSystem, path: str) -> tuple[int, int]:
    """(width, height) from the image header only (for annotations that do not state the size)."""
    try:
        with fs.open(path, "rb") as f, Image.open(f) as img:
            return img.size
    except Exception as err:
        raise CorruptImageError(f"{display(fs, path)}: {type(err).__name__}: {err}") from err
