"""Synthetic labelled images for fast tests: each class is a random colour pattern plus noise."""

from __future__ import annotations

import torch

from .base import TensorImages


def synthetic_images(num_images: int, num_classes: int, size: int, seed: int = 0) -> TensorImages:
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.rand(num_classes, 3, size, size, generator=gen)
    labels = torch.arange(num_images) % num_classes
    noise = torch.rand(num_images, 3, size, size, generator=gen) * 0.5
    images = (patterns[labels] * 0.5 + noise).clamp(0, 1)
    return TensorImages((images * 255).round().to(torch.uint8), labels, num_classes)
