"""`data.decode: gpu`: loader workers serve undecoded JPEG bytes; the training process decodes and
augments whole batches on its device.

Loader side: `encoded_train_dataset(dataset)` (imagefolder / parquet) yields `(bytes, label, skipped)`
items, where bytes is a 1-D uint8 tensor holding the JPEG file; files in other formats are decoded in
the worker (PIL) and served as uint8 3 x H x W. Unreadable files are skipped and counted by
`SkipCorrupt`, as on the CPU path. `collate_encoded` packs a batch into one `EncodedBatch` (a single
buffer, so a worker hands over one shared-memory block per batch instead of one per image).

Device side: `DeviceJpegAugment(spec).two_views(batch, device)` decodes the JPEGs (nvJPEG, batched,
through `torchvision.io.decode_jpeg` on a CUDA device; libjpeg-turbo on the CPU), decodes on the CPU
with PIL whatever that fails on, and replaces what PIL cannot read either by another image of the
batch (the batch keeps its size, which split/shuffle BN and the all-gathers need), counting it. Then
both MoCo views: random resized crops from each image's own size with torchvision's parameter
distribution and antialiased resampling (`core.crops`), flips, and `BatchAugment`'s colour jitter,
grayscale, blur and normalisation.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch.utils.data import Dataset, Subset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from ..core.augment import AugmentSpec, BatchAugment
from ..core.crops import pad_images, resized_crops, sample_crops
from .base import CorruptImageError, SkipCorrupt, to_uint8_tensor
from .files import decode_image

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"  # start-of-image marker followed by the next marker's 0xFF


def _source(dataset: Dataset, i: int) -> tuple[Dataset, int]:
    """The dataset that holds item `i` and its index there, through `Subset` wrappers."""
    while isinstance(dataset, Subset):
        dataset, i = dataset.dataset, int(dataset.indices[i])
    return dataset, i


class EncodedImages(Dataset):
    """`(uint8 tensor, label)` items: a JPEG as its file bytes (1-D), any other format decoded (3 x H x W)."""

    def __init__(self, base: Dataset) -> None:
        inner, _ = _source(base, 0)
        if not hasattr(inner, "encoded"):
            raise ValueError(
                f"data.decode='gpu' needs encoded images (data.name 'imagefolder' or 'parquet'); "
                f"{type(inner).__name__} holds decoded images: use data.decode='cpu'"
            )
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        dataset, j = _source(self.base, i)
        data, label = dataset.encoded(j)
        if data[:3] == JPEG_MAGIC:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), label
        img, label = dataset[j]  # PNG, WebP, ...: decoded here, on the worker's CPU
        return to_uint8_tensor(img), label


def encoded_train_dataset(dataset: Dataset) -> SkipCorrupt:
    """The training set for `data.decode=gpu`: `(bytes or image, label, skipped)` items."""
    return SkipCorrupt(EncodedImages(dataset))


class EncodedBatch(NamedTuple):
    """A batch of items in one buffer: `data` holds them end to end, `shapes[i]` is (3, H, W) for a
    decoded image and (0, 0, n) for n undecoded bytes."""

    data: torch.Tensor
    shapes: torch.Tensor

    def items(self) -> list[torch.Tensor]:
        sizes = [int(c * h * w) if c else int(w) for c, h, w in self.shapes.tolist()]
        parts = torch.split(self.data, sizes)
        return [p.view(c, h, w) if c else p for p, (c, h, w) in zip(parts, self.shapes.tolist(), strict=True)]


def collate_encoded(items: list[tuple[torch.Tensor, int, int]]) -> tuple[EncodedBatch, torch.Tensor, int]:
    """`(EncodedBatch, labels, skipped)` from `encoded_train_dataset` items."""
    shapes = torch.tensor([list(t.shape) if t.ndim == 3 else [0, 0, t.numel()] for t, _, _ in items])
    data = torch.cat([t.reshape(-1) for t, _, _ in items])
    labels = torch.tensor([it[1] for it in items], dtype=torch.long)
    return EncodedBatch(data, shapes), labels, sum(int(it[2]) for it in items)


def _is_jpeg(t: torch.Tensor) -> bool:
    return t.ndim == 1 and t.numel() > 3 and bytes(t[:3].tolist()) == JPEG_MAGIC


class DeviceJpegAugment:
    """Decode a batch of encoded images on a device and make both MoCo views there.

    `max_side` (default 4x the output size) bounds the padded batch: a larger image is first shrunk
    (antialiased) to that longer side. Crops keep their area and aspect fractions; the resampling then
    differs slightly from resizing in one step. `compile_backend` (e.g. "inductor") compiles the
    colour/blur/normalisation stage, some twenty element-wise passes over the views that a compiled
    graph fuses into a few; random draws then come from the compiled graph's generator.
    """

    def __init__(self, spec: AugmentSpec, max_side: int | None = None, compile_backend: str | None = None) -> None:
        self.spec = spec
        self.colour = BatchAugment(spec)
        self.max_side = max_side or 4 * spec.size
        finish = self.colour.finish
        self._finish = torch.compile(finish, backend=compile_backend) if compile_backend else finish

    def decode(
        self, batch: EncodedBatch | list[torch.Tensor], device: torch.device
    ) -> tuple[list[torch.Tensor], int]:
        """uint8 3 x H x W images on `device`, one per item, and how many items were replaced."""
        items = batch.items() if isinstance(batch, EncodedBatch) else list(batch)
        images: list[torch.Tensor | None] = [None] * len(items)
        jpegs = []
        for i, t in enumerate(items):
            if t.ndim == 3:
                images[i] = t.to(device, non_blocking=True)
            elif _is_jpeg(t):
                jpegs.append(i)
            else:
                images[i] = self._decode_on_cpu(t, i, device)
        if jpegs:
            try:
                decoded = decode_jpeg([items[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # one bad file fails the whole batched call: decode one by one
                decoded = [self._decode_one(items[i], i, device) for i in jpegs]
            for i, im in zip(jpegs, decoded, strict=True):
                images[i] = im
        good = [im for im in images if im is not None]
        if not good:
            raise CorruptImageError(f"none of the {len(items)} images of a batch could be decoded")
        replaced = 0
        for i, im in enumerate(images):
            if im is None:
                images[i] = good[replaced % len(good)]
                replaced += 1
        return [self._bounded(im) for im in images], replaced  # type: ignore[arg-type]

    def _decode_one(self, data: torch.Tensor, i: int, device: torch.device) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            return self._decode_on_cpu(data, i, device)

    @staticmethod
    def _decode_on_cpu(data: torch.Tensor, i: int, device: torch.device) -> torch.Tensor | None:
        try:
            img = decode_image(data.numpy().tobytes(), f"batch item {i}")
        except CorruptImageError as err:
            log.warning("skipping undecodable image: %s", err)
            return None
        return to_uint8_tensor(img).to(device)

    def _bounded(self, im: torch.Tensor) -> torch.Tensor:
        h, w = int(im.shape[1]), int(im.shape[2])
        if max(h, w) <= self.max_side:
            return im
        f = self.max_side / max(h, w)
        return TF.resize(im, [max(1, round(h * f)), max(1, round(w * f))], antialias=True)

    def two_views(
        self, batch: EncodedBatch | list[torch.Tensor], device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(im_q, im_k, replaced): two normalised float32 B x 3 x size x size views on `device`.

        Randomness comes from torch's global generators (CPU for crops and flips, the device's for
        colour and blur), so `torch.manual_seed` makes it repeatable.
        """
        device = torch.device(device)
        images, replaced = self.decode(batch, device)
        B, S = len(images), self.spec.size
        heights = torch.tensor([int(im.shape[1]) for im in images])
        widths = torch.tensor([int(im.shape[2]) for im in images])
        boxes = torch.stack([sample_crops(heights, widths, self.spec.crop_scale) for _ in range(2)])
        flips = torch.rand(2, B) < self.spec.flip_p
        # fp16 holds every 8-bit value and the filter weights to 11 bits; the CPU has no fast fp16 matmul
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        views = resized_crops(pad_images(images, dtype), boxes, flips, S)  # (2, B, 3, S, S)
        x = torch.empty(2 * B, 3, S, S, device=device).copy_(views.reshape(2 * B, 3, S, S)).div_(255)
        x = self._finish(x)
        return x[:B], x[B:], replaced
