"""scikit-learn's 1,797 handwritten digits (shipped with the package, no download), two ways.

* `scattered-digits`: each digit drawn at a random size (14-26 px) and position on a 32x32 canvas,
  3 placements per digit, from a fixed seed. Split 80/20 *by source digit*, so no handwritten
  instance is in both splits. Plain digits are too easy to show learning (a random-init convnet
  already scores ~0.97 kNN); scattering makes position and scale nuisances the encoder must learn
  to ignore.
* `digits`: each digit centred and upsampled to the canvas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import TensorImages

CANVAS = 32
SIZE_RANGE = (14, 26)
PLACEMENTS = 3
VAL_FRACTION = 0.2
DATA_SEED = 0  # fixed: the dataset is part of the benchmark, not of the run's randomness


def _source_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32) / 16.0  # 1797 x 8 x 8 in [0, 1]
    return images, torch.tensor(d.target, dtype=torch.long)


def _split_sources(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(DATA_SEED))
    n_val = round(n * VAL_FRACTION)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _to_uint8_rgb(gray: torch.Tensor) -> torch.Tensor:
    return (gray.clamp(0, 1) * 255).round().to(torch.uint8).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def render_scattered(sources: torch.Tensor, placements: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 (len(sources) * placements) x 3 x 32 x 32; placement p of digit i is row i * placements + p."""
    n = sources.shape[0] * placements
    sizes, xs, ys = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    for row in range(n):  # draw order is part of the dataset's definition: keep it
        sizes[row] = int(torch.randint(SIZE_RANGE[0], SIZE_RANGE[1] + 1, (1,), generator=generator))
        xs[row], ys[row] = (int(v) for v in torch.randint(0, CANVAS - int(sizes[row]) + 1, (2,), generator=generator))
    out = torch.zeros(n, CANVAS, CANVAS)
    source_of_row = torch.arange(n) // placements
    for size in sizes.unique().tolist():
        rows = (sizes == size).nonzero().flatten()
        glyphs = F.interpolate(sources[source_of_row[rows], None], size=(size, size), mode="bilinear", align_corners=False)
        for row, glyph in zip(rows.tolist(), glyphs[:, 0], strict=True):
            out[row, ys[row] : ys[row] + size, xs[row] : xs[row] + size] = glyph
    return _to_uint8_rgb(out)


def scattered_digits() -> tuple[TensorImages, TensorImages]:
    """(train, val) splits of scattered digits; the train split doubles as the kNN bank."""
    images, labels = _source_digits()
    train_src, val_src = _split_sources(images.shape[0])
    gen = torch.Generator().manual_seed(DATA_SEED + 1)
    splits = []
    for src in (train_src, val_src):
        rendered = render_scattered(images[src], PLACEMENTS, gen)
        splits.append(TensorImages(rendered, labels[src].repeat_interleave(PLACEMENTS), num_classes=10))
    return splits[0], splits[1]


def plain_digits() -> tuple[TensorImages, TensorImages]:
    """(train, val) splits of centred digits upsampled to 32x32, split like the scattered set."""
    images, labels = _source_digits()
    up = F.interpolate(images[:, None], size=(CANVAS, CANVAS), mode="bilinear", align_corners=False)[:, 0]
    train_src, val_src = _split_sources(images.shape[0])
    rgb = _to_uint8_rgb(up)
    return (
        TensorImages(rgb[train_src], labels[train_src], num_classes=10),
        TensorImages(rgb[val_src], labels[val_src], num_classes=10),
    )


def generator_parameters(name: str) -> tuple[int, int, dict]:
    """(train images, val images, what defines the images) of `scattered-digits` or `digits`, without
    rendering them: the placement constants, the seed, and a hash of the source digits."""
    import hashlib

    images, _labels = _source_digits()
    train_src, val_src = _split_sources(images.shape[0])
    placements = PLACEMENTS if name == "scattered-digits" else 1
    params = {"canvas": CANVAS, "size_range": SIZE_RANGE, "placements": placements, "val_fraction": VAL_FRACTION,
              "seed": DATA_SEED, "source_digits_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest()}
    return len(train_src) * placements, len(val_src) * placements, params
