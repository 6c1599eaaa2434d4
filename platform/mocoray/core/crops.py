"""Random resized crops of a batch of differently sized images, drawn and resampled in one go.

`sample_crops` draws crop boxes with the distribution of torchvision's `RandomResizedCrop.get_params`
(area fraction uniform in `scale`, log aspect ratio uniform in `log(ratio)`, integer sides rounded,
up to 10 tries per image, then the central-crop fallback), for all images at once.

`resized_crops` cuts and resizes them with the antialiased triangle filter that torchvision's
`resize(antialias=True)` and PIL's bilinear resize use: per view, a height matrix and a width matrix
of filter weights (zero outside the crop, flipped rows for a horizontal flip) applied to the images
padded into one tensor, as two batched matrix products. Padding gets weight zero, so what it holds
does not matter, and the result equals cropping each image and resizing it on its own.
"""

from __future__ import annotations

import math

import torch

DEFAULT_RATIO = (3 / 4, 4 / 3)


def sample_crops(
    heights: torch.Tensor,
    widths: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float] = DEFAULT_RATIO,
    generator: torch.Generator | None = None,
    tries: int = 10,
) -> torch.Tensor:
    """(B, 4) int64 boxes (top, left, height, width), one per image of the given sizes (CPU tensors)."""
    B = heights.shape[0]
    H, W = heights.double().view(B, 1), widths.double().view(B, 1)
    area = H * W * torch.empty(B, tries, dtype=torch.float64).uniform_(scale[0], scale[1], generator=generator)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(torch.empty(B, tries, dtype=torch.float64).uniform_(log_lo, log_hi, generator=generator))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first try that fits (0 if none does)
    found = fits.any(dim=1)
    w, h = w.gather(1, first).view(B), h.gather(1, first).view(B)
    H, W = H.view(B), W.view(B)
    # no try fit: the largest crop of the nearest allowed aspect ratio, centred
    image_ratio = W / H
    fb_w = torch.where(image_ratio < ratio[0], W, torch.where(image_ratio > ratio[1], torch.round(H * ratio[1]), W))
    fb_h = torch.where(image_ratio < ratio[0], torch.round(W / ratio[0]), H)
    w, h = torch.where(found, w, fb_w), torch.where(found, h, fb_h)
    u = torch.rand(B, 2, dtype=torch.float64, generator=generator)
    top = torch.where(found, torch.floor(u[:, 0] * (H - h + 1)), torch.div(H - h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(u[:, 1] * (W - w + 1)), torch.div(W - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1).long()


def resize_weights(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int) -> torch.Tensor:
    """(B, out_size, in_size) fp32 weights resampling pixels [start, start + length) of an axis to
    `out_size`, on the device of `start`.

    The antialiased triangle filter of torchvision/PIL bilinear resizing: output pixel o centres at
    (o + 0.5) * s in the crop (s = length / out_size); its filter reaches s pixels each side when
    shrinking (1 when enlarging); weights outside the crop are dropped and each row sums to 1.
    """
    B, dev = start.shape[0], start.device
    length = length.float().view(B, 1, 1)
    s = length / out_size
    reach = torch.clamp(s, min=1.0)
    centre = (torch.arange(out_size, device=dev, dtype=torch.float32).view(1, -1, 1) + 0.5) * s
    p = torch.arange(in_size, device=dev, dtype=torch.float32).view(1, 1, -1) - start.float().view(B, 1, 1)
    w = torch.clamp(1 - torch.abs(p + 0.5 - centre) / reach, min=0) * ((p >= 0) & (p < length))
    return w / w.sum(dim=2, keepdim=True)


def pad_images(images: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Images (3 x H_i x W_i) -> one zero-padded (B, H_max, 3, W_max) tensor: rows of all channels
    side by side, so that one matrix product resamples the height of every channel."""
    h_max = max(int(im.shape[1]) for im in images)
    w_max = max(int(im.shape[2]) for im in images)
    canvas = torch.zeros(len(images), h_max, 3, w_max, dtype=dtype, device=images[0].device)
    for i, im in enumerate(images):
        canvas[i, : im.shape[1], :, : im.shape[2]] = im.permute(1, 0, 2)
    return canvas


def resized_crops(canvas: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Crop-and-resize V views of each padded image: (V, B, 3, size, size) in the canvas' dtype.

    canvas: (B, H_max, 3, W_max) from `pad_images`; boxes: (V, B, 4) int64 (top, left, height, width);
    flips: (V, B) bool, a horizontal flip per view.
    """
    V, B = boxes.shape[:2]
    _, h_max, _, w_max = canvas.shape
    flat = boxes.reshape(V * B, 4).to(canvas.device, non_blocking=True)
    rows = resize_weights(flat[:, 0], flat[:, 2], size, h_max).view(V, B, size, h_max)
    cols = resize_weights(flat[:, 1], flat[:, 3], size, w_max).view(V, B, size, w_max)
    cols = torch.where(flips.to(canvas.device).view(V, B, 1, 1), cols.flip(2), cols)
    rows = rows.transpose(0, 1).reshape(B, V * size, h_max).to(canvas.dtype)
    cols = cols.transpose(0, 1).reshape(B * V, size, w_max).to(canvas.dtype)
    tall = torch.bmm(rows, canvas.view(B, h_max, 3 * w_max))  # (B, V*size, 3*W_max)
    out = torch.bmm(tall.view(B * V, size * 3, w_max), cols.transpose(1, 2))  # (B*V, size*3, size)
    return out.view(B, V, size, 3, size).permute(1, 0, 3, 2, 4)
