"""Local paths and URLs through fsspec: the one place that makes paths absolute and touches files by URL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec


def absolute(path_or_url: str) -> str:
    """Local paths made absolute (Ray workers run in their own scratch directories); URLs left alone."""
    return path_or_url if "://" in path_or_url else str(Path(path_or_url).expanduser().resolve())


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def is_dir(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.isdir(path)


def makedirs(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path, exist_ok=True)


def remove(url: str, recursive: bool = False) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.rm(path, recursive=recursive)


def list_names(url: str) -> list[str]:
    """Names of the entries directly under the folder `url` (empty if it does not exist)."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isdir(path):
        return []
    return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))


def read_tail(url: str, n: int) -> bytes:
    """The last `n` bytes of the file at `url` (all of it if it is shorter)."""
    fs, path = fsspec.core.url_to_fs(url)
    size = fs.size(path)
    with fs.open(path, "rb") as f:
        f.seek(max(0, size - n))
        return f.read()


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    """Write `data` at `url`, creating the parent folder first."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json.dumps(obj, indent=2, default=str).encode())


def arrow_filesystem(url: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) for Ray Train's storage: URLs go through fsspec, local paths stay.

    So object storage works the same for Ray's checkpoints as for everything else here: s3fs (or gcsfs, ...)
    takes its endpoint and credentials from the environment, and the filesystem Ray pickles to its workers
    holds none of them.
    """
    if "://" not in url:
        return None, url
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(url)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
