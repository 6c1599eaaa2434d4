"""Two-view augmentations of MoCo v1 and v2 ("aug+"), in two interchangeable implementations.

* `two_view_transform`: torchvision transforms applied per image in DataLoader workers; needed when
  images differ in size (ImageNet-style folders), since the random resized crop starts from the full
  image.
* `BatchAugment`: the same recipe on a whole batch of equally sized tensors at once, on whatever
  device the batch lives (the GPU path, and much faster than per-image PIL work on small CPU images).
  Differences from torchvision, by design: colour-jitter operations run in a fixed order (brightness,
  contrast, saturation, hue) instead of a random one, hue is rotated in YIQ space (a linear
  approximation of torchvision's HSV shift), and an impossible crop aspect is clamped rather than
  retried.

Recipes (MoCo papers): v1 = random resized crop (scale 0.2-1), grayscale p=0.2, colour jitter
0.4/0.4/0.4/0.4 always, flip. v2 = crop, colour jitter 0.4/0.4/0.4/0.1 with p=0.8, grayscale p=0.2,
Gaussian blur sigma 0.1-2 with p=0.5, flip. The 32 px variant leaves out the blur (a 3 px kernel on
a 32 px image destroys most of it), as common CIFAR recipes do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentSpec:
    size: int
    crop_scale: tuple[float, float] = (0.2, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    flip_p: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def moco_spec(version: str, size: int, blur: bool | None = None, crop_scale: tuple[float, float] = (0.2, 1.0),
              mean: tuple[float, float, float] = IMAGENET_MEAN, std: tuple[float, float, float] = IMAGENET_STD
              ) -> AugmentSpec:
    """The paper recipe for `version` ('v1' or 'v2') at `size` px; blur defaults to on above 64 px (v2).

    v3 takes v2's recipe: the paper's asymmetric views (BYOL's blur 1.0 / 0.1 and solarisation) are not built.
    """
    if version == "v1":
        return AugmentSpec(size, crop_scale, (0.4, 0.4, 0.4, 0.4), 1.0, 0.2, 0.0, 0.5, mean, std)
    if version in ("v2", "v3"):
        use_blur = size > 64 if blur is None else blur
        return AugmentSpec(size, crop_scale, (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5 if use_blur else 0.0, 0.5, mean, std)
    raise ValueError(f"moco.version={version!r} is not one of v1, v2, v3")


def two_view_transform(spec: AugmentSpec):
    """A torchvision transform returning two independently augmented views of one PIL image."""
    from torchvision import transforms as T

    blur_kernel = max(3, int(0.1 * spec.size) // 2 * 2 + 1)
    ops = [
        T.RandomResizedCrop(spec.size, scale=spec.crop_scale),
        T.RandomApply([T.ColorJitter(*spec.jitter)], p=spec.jitter_p),
        T.RandomGrayscale(p=spec.grayscale_p),
    ]
    if spec.blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=spec.blur_p))
    ops += [T.RandomHorizontalFlip(spec.flip_p), T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    one = T.Compose(ops)
    return lambda img: (one(img), one(img))


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _per_sample(shape0: int, lo: float, hi: float, device: torch.device, gen: torch.Generator | None) -> torch.Tensor:
    return torch.empty(shape0, device=device).uniform_(lo, hi, generator=gen).view(-1, 1, 1, 1)


class BatchAugment:
    """Apply an `AugmentSpec` to a batch (B x 3 x H x W, uint8 or float in [0, 1]) on its own device."""

    def __init__(self, spec: AugmentSpec) -> None:
        self.spec = spec

    def crop_flip(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """Random resized crop and horizontal flip in one bilinear resampling."""
        B, dev = x.shape[0], x.device
        lo, hi = self.spec.crop_scale
        area = torch.empty(B, device=dev).uniform_(lo, hi, generator=gen)
        log_ratio = torch.empty(B, device=dev).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
        ratio = torch.exp(log_ratio)
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width/height as fractions of the image
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(B, device=dev, generator=gen) * 2 - 1) * (1 - w)  # centre in [-1, 1] coords
        cy = (torch.rand(B, device=dev, generator=gen) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(B, device=dev, generator=gen) < self.spec.flip_p, -1.0, 1.0)
        theta = torch.zeros(B, 2, 3, device=dev)
        theta[:, 0, 0] = w * flip
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = h
        theta[:, 1, 2] = cy
        grid = F.affine_grid(theta, [B, x.shape[1], self.spec.size, self.spec.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def color(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        B, dev = x.shape[0], x.device
        b, c, s, hue = self.spec.jitter
        apply = (torch.rand(B, device=dev, generator=gen) < self.spec.jitter_p).view(-1, 1, 1, 1)
        y = x
        if b > 0:
            y = y * _per_sample(B, max(0.0, 1 - b), 1 + b, dev, gen)
        if c > 0:
            mean = _grayscale(y).mean(dim=(1, 2, 3), keepdim=True)
            y = (y - mean) * _per_sample(B, max(0.0, 1 - c), 1 + c, dev, gen) + mean
        if s > 0:
            gray = _grayscale(y)
            y = (y - gray) * _per_sample(B, max(0.0, 1 - s), 1 + s, dev, gen) + gray
        if hue > 0:
            angle = _per_sample(B, -hue, hue, dev, gen).view(B) * 2 * math.pi
            y = _rotate_hue(y.clamp(0, 1), angle)
        x = torch.where(apply, y.clamp(0, 1), x)
        gray = (torch.rand(B, device=dev, generator=gen) < self.spec.grayscale_p).view(-1, 1, 1, 1)
        return torch.where(gray, _grayscale(x).expand_as(x), x)

    def blur(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        if self.spec.blur_p <= 0:
            return x
        B, C, H, W = x.shape
        dev = x.device
        radius = max(1, int(0.1 * self.spec.size) // 2)
        sigma = torch.empty(B, device=dev).uniform_(0.1, 2.0, generator=gen)
        apply = torch.rand(B, device=dev, generator=gen) < self.spec.blur_p
        sigma = torch.where(apply, sigma, torch.full_like(sigma, 1e-3))  # ~identity kernel
        t = torch.arange(-radius, radius + 1, device=dev, dtype=x.dtype)
        k = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
        k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # (B*C) x (2r+1)
        y = x.reshape(1, B * C, H, W)
        y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(B * C, 1, 1, -1), groups=B * C)
        y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(B * C, 1, -1, 1), groups=B * C)
        return y.view(B, C, H, W)

    def finish(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Everything after the crop: colour jitter, grayscale, blur, normalisation (float in [0, 1] in)."""
        x = self.blur(self.color(x, gen), gen)
        mean = torch.tensor(self.spec.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        return self.finish(self.crop_flip(x, gen), gen)

    def two_views(self, x: torch.Tensor, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self(x, gen), self(x, gen)


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma plane (I, Q) of YIQ by `angle` radians per sample."""
    to_yiq = _RGB2YIQ.to(x.device, x.dtype)
    to_rgb = torch.linalg.inv(to_yiq)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(x.shape[0], 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    m = to_rgb @ rot @ to_yiq  # B x 3 x 3
    return torch.einsum("bij,bjhw->bihw", m, x)


def normalize_batch(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD, size: int | None = None) -> torch.Tensor:
    """uint8/float batch -> normalised float batch (optionally resized): the batched eval view."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
