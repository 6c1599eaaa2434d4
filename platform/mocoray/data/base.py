"""What every dataset provides, and the wrappers the training loops put around it.

A dataset item is `(image, label)`: image is a PIL RGB image (any size) or a uint8 tensor 3xHxW;
label is an int (-1 when unknown). Datasets that hold all images in memory as one uint8 tensor
(`TensorImages`) also serve whole batches at once through `__getitems__`, which the DataLoader uses.

Decoding can fail on real data. A dataset raises `CorruptImageError` for such an item;
`SkipCorrupt` then serves the next readable item instead (so every batch keeps its size, which
shuffle BN needs) and reports that it replaced the item, so the loop can count and log it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)
_warned: set[str] = set()  # corrupt files this process has reported (a warning per file, not one per pass)


class CorruptImageError(RuntimeError):
    """An image that cannot be decoded; carries where it came from."""


class DatasetNotFoundError(FileNotFoundError):
    """A configured dataset path that does not exist (the message names the path)."""


class TensorImages(Dataset):
    """Images in memory: uint8 N x 3 x H x W and int64 labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 N x 3 x H x W images, got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels = images, labels.long()
        self.num_classes = num_classes if num_classes is not None else int(labels.max()) + 1

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        idx = torch.as_tensor(indices)
        return [(self.images[idx], self.labels[idx])]  # one pre-collated batch, see collate_batch

    def subset(self, indices) -> TensorImages:
        idx = torch.as_tensor(indices)
        return TensorImages(self.images[idx], self.labels[idx], self.num_classes)


@dataclass
class PretrainData:
    """The unlabelled training images and the labelled split for the kNN monitor."""

    train: Dataset
    knn_bank: Dataset
    knn_val: Dataset
    num_classes: int
    image_size: int


def to_uint8_tensor(img, size: int | None = None) -> torch.Tensor:
    """PIL image or uint8 tensor -> uint8 3 x size x size (shorter side resized, centre-cropped)."""
    if isinstance(img, torch.Tensor):
        t = img
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        if size is not None and (t.shape[-1] != size or t.shape[-2] != size):
            from torchvision.transforms.v2 import functional as TF

            t = TF.center_crop(TF.resize(t, size, antialias=True), [size, size])
        return t.contiguous()
    img = img.convert("RGB")
    if size is not None and img.size != (size, size):
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class SkipCorrupt(Dataset):
    """Items as `(image, label, replaced)`: a corrupt item is replaced by the next readable one.

    `replaced` is 1 when item i itself was corrupt, else 0. Counting that (not how many files were passed
    over to find a readable one) counts each corrupt file once per pass: a run of r adjacent corrupt files
    is r items, each requested once, not r + (r-1) + ... + 1 skips.
    """

    def __init__(self, base: Dataset, max_consecutive: int = 100) -> None:
        self.base = base
        self.max_consecutive = max_consecutive

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        n = len(self)
        for skipped in range(min(self.max_consecutive, n)):
            j = (i + skipped) % n
            try:
                img, label = self.base[j]
                return img, label, int(skipped > 0)
            except CorruptImageError as err:
                source = str(err).split(": ", 1)[0]  # messages are "<file or shard row>: <reason>"
                if source not in _warned:
                    _warned.add(source)
                    log.warning("skipping corrupt image: %s", err)
        raise RuntimeError(f"{self.max_consecutive} consecutive corrupt images from index {i}; is the dataset readable?")


class Resized(Dataset):
    """`(uint8 tensor 3 x size x size, label, skipped)` items from a SkipCorrupt dataset."""

    def __init__(self, base: SkipCorrupt, size: int) -> None:
        self.base, self.size = base, size

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, label, skipped = self.base[i]
        return to_uint8_tensor(img, self.size), label, skipped


class Transformed(Dataset):
    """`(transform(image), label, skipped)` items: the per-image torchvision path."""

    def __init__(self, base: SkipCorrupt, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, label, skipped = self.base[i]
        if isinstance(img, torch.Tensor):
            from torchvision.transforms.functional import to_pil_image

            img = to_pil_image(img)
        return self.transform(img), label, skipped


def collate_batch(items: list) -> tuple:
    """Stack `(x, label, skipped)` items; accepts `TensorImages`' pre-collated single batch as well."""
    if len(items) == 1 and isinstance(items[0], tuple) and len(items[0]) == 2 and isinstance(items[0][1], torch.Tensor):
        images, labels = items[0]
        return images, labels, 0
    first = items[0][0]
    labels = torch.tensor([it[1] for it in items], dtype=torch.long)
    skipped = sum(int(it[2]) for it in items)
    if isinstance(first, tuple):  # two views
        return (torch.stack([it[0][0] for it in items]), torch.stack([it[0][1] for it in items])), labels, skipped
    return torch.stack([it[0] for it in items]), labels, skipped


def subset(dataset: Dataset, indices) -> Dataset:
    """The items `indices` of `dataset` (an in-memory set stays one tensor)."""
    if isinstance(dataset, TensorImages):
        return dataset.subset(indices)
    from torch.utils.data import Subset

    return Subset(dataset, list(indices))


def take(dataset: Dataset, n: int | None) -> Dataset:
    """The first `n` items of `dataset` (all of them when `n` is None or larger)."""
    if n is None or len(dataset) <= n:  # type: ignore[arg-type]
        return dataset
    return subset(dataset, range(n))


def image_batches(dataset: Dataset, indices: list[int], batch_size: int, size: int, loader_workers: int = 0):
    """(uint8 images, labels) batches of `dataset[indices]`, images resized to `size` (in-memory sets sliced)."""
    if isinstance(dataset, TensorImages):
        idx = torch.as_tensor(indices)
        for i in range(0, len(indices), batch_size):
            yield dataset.images[idx[i : i + batch_size]], dataset.labels[idx[i : i + batch_size]]
        return
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(Resized(SkipCorrupt(dataset), size), indices), batch_size=batch_size,
                        num_workers=loader_workers, collate_fn=collate_batch)
    for x, y, _ in loader:
        yield x, y
