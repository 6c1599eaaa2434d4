"""The detection item format, box checks that repair or drop bad boxes and count them, and the collate fn.

An item is `(image, target)`: image a uint8 tensor 3 x H x W, target a dict with
`boxes` float32 N x 4 (x0, y0, x1, y1 in absolute pixels, continuous coordinates: a box covering
pixel columns 0..9 is x0=0, x1=10), `labels` int64 N in 1..C (0 is the background class of
torchvision's Faster R-CNN), `difficult` and `iscrowd` bool N, and `image_id` int (unique within
the dataset; the evaluators key ground truth and predictions by it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from fsspec import AbstractFileSystem
from torch.utils.data import Dataset

from ..base import CorruptImageError, to_uint8_tensor
from ..files import decode_image, display

log = logging.getLogger(__name__)

Target = dict[str, torch.Tensor | int]
ItemTransform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]


@dataclass
class AnnotationCounts:
    """What reading the annotations repaired or dropped (nothing is dropped silently)."""

    images: int = 0  # images the dataset serves
    boxes: int = 0  # boxes it serves
    boxes_clipped: int = 0  # reached outside the image; clipped to it and kept
    boxes_degenerate: int = 0  # dropped: not finite, or no width or height (after clipping)
    boxes_flagged_dropped: int = 0  # dropped on request: VOC `difficult` or COCO `iscrowd` objects
    boxes_unknown_image: int = 0  # dropped: refer to an image the annotation file does not list (COCO)
    boxes_unknown_category: int = 0  # dropped: refer to a category the annotation file does not list (COCO)
    images_empty: int = 0  # served with no boxes (kept: they still count for false positives)
    images_empty_dropped: int = 0  # left out because they had no usable box (skip_empty)
    images_unreadable_annotation: int = 0  # left out: annotation file missing or not parseable
    per_source: dict[str, int] = field(default_factory=dict)  # images served per (year, split) / file

    def as_dict(self) -> dict[str, int]:
        out = asdict(self)
        per_source = out.pop("per_source")
        out.update({f"images.{k}": v for k, v in per_source.items()})  # names MLflow accepts as metric keys
        return out


@dataclass
class ImageRecord:
    """One image's location and its cleaned annotation, read once when the dataset is built."""

    path: str
    image_id: int
    width: int
    height: int
    boxes: torch.Tensor  # float32 N x 4
    labels: torch.Tensor  # int64 N
    difficult: torch.Tensor  # bool N
    iscrowd: torch.Tensor  # bool N
    source: str = ""  # which (year, split) or file it came from, for the per-source counts


def make_target(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    image_id: int,
    difficult: torch.Tensor | None = None,
    iscrowd: torch.Tensor | None = None,
) -> Target:
    n = boxes.shape[0]
    no = torch.zeros(n, dtype=torch.bool)
    return {
        "boxes": boxes.to(torch.float32).reshape(n, 4),
        "labels": labels.to(torch.int64),
        "difficult": no if difficult is None else difficult.to(torch.bool),
        "iscrowd": no if iscrowd is None else iscrowd.to(torch.bool),
        "image_id": int(image_id),
    }


def clean_record(
    record: ImageRecord, counts: AnnotationCounts, drop_flagged: bool, flag: str
) -> ImageRecord:
    """Clip boxes to the image, drop degenerate ones (torchvision asserts x1 > x0 and y1 > y0) and,
    when `drop_flagged`, the objects whose `flag` ("difficult" or "iscrowd") is set; count each."""
    b = record.boxes.reshape(-1, 4).to(torch.float32)
    finite = torch.isfinite(b).all(dim=1)
    clipped = b.clone()
    clipped[:, 0::2] = b[:, 0::2].clamp(0, record.width)
    clipped[:, 1::2] = b[:, 1::2].clamp(0, record.height)
    changed = finite & (clipped != b).any(dim=1)
    has_area = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    keep = finite & has_area
    counts.boxes_degenerate += int((~keep).sum())
    counts.boxes_clipped += int((changed & keep).sum())
    flagged = getattr(record, flag)
    if drop_flagged:
        counts.boxes_flagged_dropped += int((keep & flagged).sum())
        keep &= ~flagged
    return ImageRecord(
        record.path, record.image_id, record.width, record.height,
        clipped[keep], record.labels[keep], record.difficult[keep], record.iscrowd[keep], record.source,
    )


def finish_records(
    records: list[ImageRecord], counts: AnnotationCounts, skip_empty: bool, where: str
) -> list[ImageRecord]:
    """Drop (skip_empty) or count the images left without boxes; refuse a split with no image left.

    The kept records get contiguous image ids 0..n-1."""
    kept = []
    for r in records:
        if r.boxes.shape[0] == 0:
            if skip_empty:
                counts.images_empty_dropped += 1
                continue
            counts.images_empty += 1
        r.image_id = len(kept)
        kept.append(r)
        counts.per_source[r.source] = counts.per_source.get(r.source, 0) + 1
    counts.images = len(kept)
    counts.boxes = sum(r.boxes.shape[0] for r in kept)
    if not kept:
        raise ValueError(f"{where}: no usable image left (counts: {counts.as_dict()})")
    dropped = {k: v for k, v in counts.as_dict().items()
               if v and k not in ("images", "boxes") and "." not in k}
    if dropped:
        log.warning("%s: %s", where, ", ".join(f"{k}={v}" for k, v in dropped.items()))
    return kept


class FileDetections(Dataset):
    """`(uint8 image, target)` items from image files (any fsspec filesystem) and cleaned records.

    An image that is missing, cannot be decoded or is not the size its annotation states raises
    `CorruptImageError`; wrap the dataset in `data.base.SkipCorrupt` to serve the next image instead
    and count it (`collate_detection` sums those counts)."""

    def __init__(
        self,
        fs: AbstractFileSystem,
        records: Sequence[ImageRecord],
        classes: Sequence[str],
        counts: AnnotationCounts,
        transform: ItemTransform | None = None,
    ) -> None:
        self.fs, self.records, self.classes, self.counts = fs, list(records), list(classes), counts
        self.num_classes = len(self.classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def target(self, i: int) -> Target:
        """Item i's target without reading its image."""
        r = self.records[i]
        return make_target(r.boxes, r.labels, r.image_id, r.difficult, r.iscrowd)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        r = self.records[i]
        where = display(self.fs, r.path)
        try:
            with self.fs.open(r.path, "rb") as f:
                data = f.read()
        except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
            raise CorruptImageError(f"{where}: {type(err).__name__}: {err}") from err
        image = to_uint8_tensor(decode_image(data, where))
        if (image.shape[2], image.shape[1]) != (r.width, r.height):
            raise CorruptImageError(
                f"{where}: the image is {image.shape[2]}x{image.shape[1]} but its annotation says "
                f"{r.width}x{r.height} (boxes would be misplaced)"
            )
        target = self.target(i)
        return self.transform(image, target) if self.transform else (image, target)


def collate_detection(items: list[tuple]) -> tuple[list[torch.Tensor], list[Target], int]:
    """(images, targets, skipped) from `(image, target)` items or SkipCorrupt's `(image, target, skipped)`.

    Images stay a list: torchvision's detectors take images of different sizes and batch them
    themselves (GeneralizedRCNNTransform resizes and pads)."""
    images = [it[0] for it in items]
    targets = [it[1] for it in items]
    skipped = sum(int(it[2]) for it in items if len(it) == 3)
    return images, targets, skipped


class RandomHorizontalFlip:
    """Flip the image and its boxes left-right with probability p (the usual detection augmentation).

    Not for digits, whose mirror images are not digits."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(()) >= self.p:
            return image, target
        width = image.shape[-1]
        boxes = target["boxes"].clone()
        boxes[:, 0], boxes[:, 2] = width - target["boxes"][:, 2], width - target["boxes"][:, 0]
        return image.flip(-1), {**target, "boxes": boxes}
