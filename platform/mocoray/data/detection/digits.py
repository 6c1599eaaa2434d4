"""`scattered-digits-det`: 1-5 scikit-learn digits per canvas, boxed by their ink, for tests and CPU demos.

Each canvas (64x64 by default) holds 1 to 5 digits, each drawn at a random size in the range
`scattered-digits` uses (14-26 px) and at a random position; the box of a digit is the tight box of
its nonzero pixels (its ink), its label 1 + the digit. A digit whose ink box would overlap an already
placed one by more than IoU 0.3 is placed again (up to 20 tries, then left out), so every box shows
its digit. Splits are by source digit, the same split as `scattered-digits`: no handwritten instance
is in both, and none of the validation digits was seen by an encoder pretrained on the
`scattered-digits` train split.

Why 64 px: the digits keep the scale the digits encoders were pretrained at, five of them fit with
little overlap, and an image costs about 4x a 32 px pretraining image: a small_resnet detector
trains at 9-27 images/s on one CPU core and reaches AP50 ~0.9 within 3,000 images seen
(benchmarks/detection_digits.py, figures in benchmarks/README.md).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..digits import DATA_SEED, SIZE_RANGE, _source_digits, _split_sources, _to_uint8_rgb
from .base import AnnotationCounts, ItemTransform, Target, make_target

CANVAS = 64
MAX_DIGITS = 5
MAX_OVERLAP = 0.3  # IoU between ink boxes above which a digit is placed again
PLACEMENT_TRIES = 20
CLASSES = tuple(str(d) for d in range(10))


def _area(b: np.ndarray) -> np.ndarray:
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], others[:, :2])
    rb = np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    return inter / (_area(box) + _area(others) - inter)


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True in each row (every row has one: every digit has ink)."""
    return mask.to(torch.uint8).argmax(1)


class GlyphBank:
    """One split's source digits resized to every size in SIZE_RANGE, as uint8 (what the canvas stores),
    with their ink boxes. Batched, and built once per split per process (`split_bank`): resizing per
    placement would dominate the dataset's build time."""

    def __init__(self, sources: torch.Tensor, labels: torch.Tensor, source_ids: torch.Tensor) -> None:
        self.labels, self.source_ids = labels, source_ids
        self.glyphs: dict[int, torch.Tensor] = {}
        self.ink_boxes: dict[int, np.ndarray] = {}
        for size in range(SIZE_RANGE[0], SIZE_RANGE[1] + 1):
            g = F.interpolate(sources[:, None], size=(size, size), mode="bilinear", align_corners=False)
            # quantised like every scattered-digits image; since rounding keeps order, the max of
            # quantised glyphs on the canvas equals the quantised max of the float ones
            glyphs = _to_uint8_rgb(g[:, 0])[:, 0].contiguous()
            ink = glyphs > 0  # the ink a viewer sees
            rows, cols = ink.any(2), ink.any(1)  # n x size each
            x0, y0 = _first_true(cols), _first_true(rows)
            x1, y1 = size - _first_true(cols.flip(1)), size - _first_true(rows.flip(1))
            self.glyphs[size] = glyphs
            self.ink_boxes[size] = torch.stack([x0, y0, x1, y1], dim=1).numpy().astype(np.float32)

    def __len__(self) -> int:
        return self.labels.shape[0]


@functools.lru_cache(maxsize=2)
def split_bank(split: str) -> GlyphBank:
    """The glyphs of the `train` or `val` source digits (the split of `scattered-digits`)."""
    images, labels = _source_digits()
    train_src, val_src = _split_sources(images.shape[0])
    src = {"train": train_src, "val": val_src}[split]
    return GlyphBank(images[src], labels[src], src)


def render_canvas(
    bank: GlyphBank, rng: np.random.Generator, canvas: int, max_digits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 canvas H x W, boxes float32 N x 4, labels int64 N in 1..10, source digit ids N) for one
    image."""
    gray = torch.zeros(canvas, canvas, dtype=torch.uint8)
    boxes: list[np.ndarray] = []
    out_labels: list[int] = []
    sources: list[int] = []
    for _ in range(int(rng.integers(1, max_digits + 1))):
        for _ in range(PLACEMENT_TRIES):  # draw order is part of the dataset's definition: keep it
            size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
            src = int(rng.integers(len(bank)))
            x, y = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
            box = bank.ink_boxes[size][src] + np.array([x, y, x, y], dtype=np.float32)
            if boxes and _iou(box, np.stack(boxes)).max() > MAX_OVERLAP:
                continue
            region = gray[y : y + size, x : x + size]
            torch.maximum(region, bank.glyphs[size][src], out=region)  # overlapping digits keep both inks
            boxes.append(box)
            out_labels.append(int(bank.labels[src]) + 1)
            sources.append(int(bank.source_ids[src]))
            break
    labels = torch.tensor(out_labels, dtype=torch.int64)
    return gray, torch.from_numpy(np.stack(boxes)), labels, torch.tensor(sources)


class ScatteredDigitsDet(Dataset):
    """`(uint8 3 x canvas x canvas, target)` items rendered once from a split's glyphs, deterministic in
    `seed`.

    `box_sources[i]` names the source digit (an index into scikit-learn's set) each box of image i shows."""

    def __init__(
        self,
        bank: GlyphBank,
        num_images: int,
        seed: tuple[int, ...],
        canvas: int = CANVAS,
        max_digits: int = MAX_DIGITS,
        transform: ItemTransform | None = None,
    ) -> None:
        if canvas < SIZE_RANGE[1]:
            raise ValueError(f"canvas={canvas} is smaller than the largest digit ({SIZE_RANGE[1]} px)")
        if max_digits < 1:
            raise ValueError(f"max_digits={max_digits} must be at least 1")
        if num_images < 1:
            raise ValueError(f"num_images={num_images} must be at least 1")
        rng = np.random.default_rng(list(seed))
        grays, self.boxes, self.labels, self.box_sources = [], [], [], []
        for _ in range(num_images):
            gray, boxes, labs, srcs = render_canvas(bank, rng, canvas, max_digits)
            grays.append(gray)
            self.boxes.append(boxes)
            self.labels.append(labs)
            self.box_sources.append(srcs)
        self.images = torch.stack(grays)[:, None].expand(-1, 3, -1, -1).contiguous()
        self.classes, self.num_classes = list(CLASSES), len(CLASSES)
        self.transform = transform
        self.counts = AnnotationCounts(images=num_images, boxes=sum(b.shape[0] for b in self.boxes))

    def __len__(self) -> int:
        return self.images.shape[0]

    def target(self, i: int) -> Target:
        return make_target(self.boxes[i], self.labels[i], i)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        image, target = self.images[i], self.target(i)
        return self.transform(image, target) if self.transform else (image, target)


def scattered_digits_det(
    train_images: int = 2000,
    val_images: int = 500,
    *,
    canvas: int = CANVAS,
    max_digits: int = MAX_DIGITS,
    seed: int = DATA_SEED,
    transform: ItemTransform | None = None,
) -> tuple[ScatteredDigitsDet, ScatteredDigitsDet]:
    """(train, val) canvases; train draws digits only from the train sources, val from the val sources.

    `transform` applies to the train split only."""
    train = ScatteredDigitsDet(split_bank("train"), train_images, (seed, 0), canvas, max_digits, transform)
    val = ScatteredDigitsDet(split_bank("val"), val_images, (seed, 1), canvas, max_digits)
    return train, val
