"""Synthetic images: labelled colour patterns for fast tests, and photo-like JPEG folders for benchmarks."""

from __future__ import annotations

import io
import multiprocessing
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from .base import TensorImages


def synthetic_images(num_images: int, num_classes: int, size: int, seed: int = 0) -> TensorImages:
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.rand(num_classes, 3, size, size, generator=gen)
    labels = torch.arange(num_images) % num_classes
    noise = torch.rand(num_images, 3, size, size, generator=gen) * 0.5
    images = (patterns[labels] * 0.5 + noise).clamp(0, 1)
    return TensorImages((images * 255).round().to(torch.uint8), labels, num_classes)


# Typical ImageNet train sizes (width, height): most are 500 px on the longer side.
PHOTO_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (333, 500), (500, 500), (640, 480), (400, 300))


def photo_like(seed: int, width: int, height: int) -> Image.Image:
    """An RGB image with the broad statistics of a photo, not of noise: smooth colour gradients, a few
    hard-edged shapes at several scales, mid-frequency texture and a little sensor-like grain, so that
    JPEG files come out at photo-like sizes (ImageNet's average 110 KB is about 5 bits per pixel)."""
    rng = np.random.default_rng(seed)
    gw, gh = int(rng.integers(3, 9)), int(rng.integers(3, 7))
    background = Image.fromarray(rng.integers(0, 256, (gh, gw, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    img = background
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 14))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.03, 0.35) * min(width, height)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([cx - r, cy - r * rng.uniform(0.4, 1.0), cx + r, cy + r], fill=colour)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r * rng.uniform(0.3, 1.0), cx + r, cy + r], fill=colour)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 8))))
            draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles], fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))  # lens softness: edges of 1-3 px
    pixels = np.asarray(img, dtype=np.float32)
    for step, amplitude in ((16, 10.0), (4, 10.0), (2, 10.0), (1, 8.0)):  # texture at several scales
        field = rng.standard_normal((height // step + 1, width // step + 1), dtype=np.float32)
        field = np.asarray(Image.fromarray(field).resize((width, height), Image.BILINEAR))
        pixels += amplitude * field[..., None]
    pixels += rng.standard_normal((height, width, 3), dtype=np.float32) * 6.0  # grain
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_photo(job: tuple[str, int, int, int, int]) -> int:
    path, seed, width, height, quality = job
    buf = io.BytesIO()
    photo_like(seed, width, height).save(buf, "JPEG", quality=quality)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return len(buf.getvalue())


def write_photo_folder(root: str, num_images: int, num_classes: int = 10, quality: int = 90, seed: int = 0,
                       sizes: tuple[tuple[int, int], ...] = PHOTO_SIZES, processes: int = 1) -> int:
    """Write `root/<class>/<i>.jpg` (ImageFolder layout) of `photo_like` images; returns the bytes written."""
    jobs = []
    for i in range(num_images):
        folder = os.path.join(root, f"class_{i % num_classes:03d}")
        os.makedirs(folder, exist_ok=True)
        width, height = sizes[(seed + i) % len(sizes)]
        jobs.append((os.path.join(folder, f"{i:06d}.jpg"), seed * 1_000_003 + i, width, height, quality))
    if processes <= 1:
        return sum(map(_write_photo, jobs))
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return sum(pool.map(_write_photo, jobs, chunksize=8))
