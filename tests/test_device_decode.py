"""`data.decode: gpu` on CPU tensors: crop parameters and resampling against torchvision, colour
statistics against the per-image torchvision path, and what happens to corrupt or non-JPEG files."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from mocoray.core.augment import IMAGENET_MEAN, IMAGENET_STD, moco_spec, two_view_transform
from mocoray.core.crops import pad_images, resized_crops, sample_crops
from mocoray.data.base import CorruptImageError, TensorImages
from mocoray.data.device_decode import (
    DeviceJpegAugment,
    EncodedBatch,
    collate_encoded,
    encoded_train_dataset,
)
from mocoray.data.external import ImageFolderFS
from mocoray.data.parquet import ParquetImages
from mocoray.data.synthetic import photo_like


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


@pytest.mark.parametrize("height,width", [(375, 500), (500, 333), (90, 500)])
def test_crop_boxes_follow_torchvision_random_resized_crop_distribution(height, width):
    n, scale, ratio = 3000, (0.2, 1.0), (3 / 4, 4 / 3)
    ours = sample_crops(torch.full((n,), height), torch.full((n,), width), scale, ratio,
                        torch.Generator().manual_seed(0)).double().numpy()
    torch.manual_seed(1)
    stub = torch.empty(3, height, width)
    theirs = np.array([RandomResizedCrop.get_params(stub, list(scale), list(ratio)) for _ in range(n)], dtype=float)
    for boxes in (ours, theirs):
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= height).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= width).all()

    def features(b):  # area fraction, log aspect, relative position of the crop in the free room
        top = np.where(b[:, 2] < height, b[:, 0] / np.maximum(height - b[:, 2], 1), 0.5)
        left = np.where(b[:, 3] < width, b[:, 1] / np.maximum(width - b[:, 3], 1), 0.5)
        return [b[:, 2] * b[:, 3] / (height * width), np.log(b[:, 3] / b[:, 2]), top, left]

    # 5% is the KS critical value for 3000 vs 3000 samples at p = 0.002; the seeds are fixed
    for mine, ref in zip(features(ours), features(theirs), strict=True):
        assert _ks(mine, ref) < 0.05


def test_crop_fallback_is_torchvision_central_crop_when_no_try_fits():
    # a 10 x 1000 strip: no crop of 90-100% of its area has an aspect ratio within 3/4..4/3
    for height, width in [(10, 1000), (1000, 10)]:
        box = sample_crops(torch.tensor([height]), torch.tensor([width]), (0.9, 1.0))[0].tolist()
        ref = RandomResizedCrop.get_params(torch.empty(3, height, width), [0.9, 1.0], [3 / 4, 4 / 3])
        assert box == list(ref)


def test_resized_crops_equal_torchvision_antialiased_resized_crop_and_flip():
    torch.manual_seed(0)
    images = [torch.rand(3, h, w) * 255 for h, w in [(60, 80), (75, 50), (40, 41), (90, 130)]]
    heights = torch.tensor([im.shape[1] for im in images])
    widths = torch.tensor([im.shape[2] for im in images])
    for size in (32, 100):  # mostly shrinking / mostly enlarging
        boxes = torch.stack([sample_crops(heights, widths, (0.08, 1.0)) for _ in range(2)])
        flips = torch.tensor([[True, False, True, False], [False, False, True, True]])
        out = resized_crops(pad_images(images, torch.float32), boxes, flips, size)
        for v in range(2):
            for b, im in enumerate(images):
                top, left, h, w = boxes[v, b].tolist()
                ref = TF.resized_crop(im, top, left, h, w, [size, size], antialias=True)
                ref = ref.flip(-1) if flips[v, b] else ref
                assert torch.allclose(out[v, b], ref, atol=1e-3)  # on a 0..255 scale


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    photo_like(seed, *size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _pixel_stats(views: torch.Tensor) -> dict[str, torch.Tensor]:
    x = views * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return {
        "mean": x.mean(dim=(0, 2, 3)),
        "std": x.std(dim=(0, 2, 3)),
        "per-image std": x.std(dim=(2, 3)).mean(0),
        "chroma": x.std(dim=1).mean(),  # spread across channels: saturation jitter and grayscale
        "gradient": (x[..., 1:] - x[..., :-1]).abs().mean(),  # blur and resampling sharpness
    }


# Tolerances on [0, 1] pixel values, about twice the largest seed-to-seed spread measured for either
# path with these settings (means 0.008, stds 0.007, chroma 0.008, gradient 2.3%).
TOLERANCE = {"mean": 0.015, "std": 0.015, "per-image std": 0.015, "chroma": 0.015}
GRADIENT_RTOL = 0.05


def _stats_close(a: dict, b: dict) -> bool:
    close = all(torch.all((a[k] - b[k]).abs() <= tol) for k, tol in TOLERANCE.items())
    return close and abs(float(a["gradient"] / b["gradient"]) - 1) <= GRADIENT_RTOL


def test_device_views_match_torchvision_cpu_views_in_colour_statistics():
    spec = moco_spec("v2", 48, blur=True)
    blobs = [_jpeg(i, [(96, 72), (72, 96), (88, 64)][i % 3]) for i in range(48)]
    repeats = 8
    torch.manual_seed(0)
    per_image = two_view_transform(spec)
    cpu = torch.stack([v for b in blobs for _ in range(repeats) for v in per_image(Image.open(io.BytesIO(b)))])
    items = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]

    def device_stats(s):
        torch.manual_seed(0)
        aug = DeviceJpegAugment(s)
        return _pixel_stats(torch.cat([torch.cat(aug.two_views(items, "cpu")[:2]) for _ in range(repeats // 2)]))

    reference = _pixel_stats(cpu)
    assert _stats_close(device_stats(spec), reference)
    # the comparison has the power to see a missing piece of the recipe
    assert not _stats_close(device_stats(dataclasses.replace(spec, grayscale_p=0.0)), reference)
    assert not _stats_close(device_stats(dataclasses.replace(spec, blur_p=0.0)), reference)


def test_device_decode_falls_back_to_cpu_for_other_formats_and_replaces_undecodable_items():
    good = _jpeg(0, (64, 48))
    png = io.BytesIO()
    photo_like(1, 40, 30).save(png, "PNG")
    items = [
        torch.frombuffer(bytearray(good), dtype=torch.uint8),
        torch.frombuffer(bytearray(good[: len(good) // 2]), dtype=torch.uint8),  # truncated JPEG
        torch.frombuffer(bytearray(png.getvalue()), dtype=torch.uint8),  # PNG bytes: decoded by PIL
        torch.frombuffer(bytearray(b"not an image at all"), dtype=torch.uint8),
        torch.zeros(3, 20, 24, dtype=torch.uint8),  # decoded by a loader worker already
    ]
    aug = DeviceJpegAugment(moco_spec("v2", 32))
    images, replaced = aug.decode(items, torch.device("cpu"))
    assert replaced == 2 and len(images) == 5  # each replaced by the next good image, in turn
    assert [tuple(im.shape) for im in images] == [(3, 48, 64), (3, 48, 64), (3, 30, 40), (3, 30, 40), (3, 20, 24)]
    assert torch.equal(images[2], torch.from_numpy(np.array(Image.open(png).convert("RGB"))).permute(2, 0, 1))
    im_q, im_k, replaced = aug.two_views(items, "cpu")
    assert im_q.shape == im_k.shape == (5, 3, 32, 32) and replaced == 2 and torch.isfinite(im_q).all()
    with pytest.raises(CorruptImageError, match="none of the 2 images"):
        aug.decode(items[1:2] + items[3:4], torch.device("cpu"))


def test_oversized_images_are_shrunk_to_max_side_before_cropping():
    aug = DeviceJpegAugment(moco_spec("v2", 32), max_side=100)
    (image,), _ = aug.decode([torch.frombuffer(bytearray(_jpeg(2, (400, 150))), dtype=torch.uint8)], torch.device("cpu"))
    assert tuple(image.shape) == (3, 38, 100)


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    for i, (cls, name) in enumerate([("a", "0.jpg"), ("a", "1.png"), ("b", "2.jpg"), ("b", "3.png")]):
        (root / cls).mkdir(parents=True, exist_ok=True)
        photo_like(i, 40 + i, 30).save(root / cls / name)
    (root / "b" / "3.png").write_bytes(b"\x89PNG broken")  # listed as an image, does not decode
    return root


def test_encoded_items_are_jpeg_bytes_or_worker_decoded_images_and_skips_are_counted(photo_folder: Path):
    folder = ImageFolderFS(fsspec.filesystem("file"), str(photo_folder))
    ds = encoded_train_dataset(folder)
    first, label, skipped = ds[0]
    assert first.dtype == torch.uint8 and first.ndim == 1 and label == 0 and skipped == 0
    assert bytes(first.numpy()) == (photo_folder / "a" / "0.jpg").read_bytes()
    png, _, _ = ds[1]
    assert tuple(png.shape) == (3, 30, 41)
    replacement, label, skipped = ds[3]  # the broken PNG: the next readable item (wrapping round), counted
    assert skipped == 1 and label == 0 and torch.equal(replacement, first)
    (photo_folder / "b" / "2.jpg").unlink()  # vanished since listing: skipped too
    batch, labels, skipped = collate_encoded([ds[i] for i in range(4)])
    assert skipped == 2 and labels.tolist() == [0, 0, 0, 0]  # two bad files, each counted once
    assert isinstance(batch, EncodedBatch) and batch.data.ndim == 1
    items = batch.items()
    assert torch.equal(items[0], first) and torch.equal(items[1], png)
    # through a worker process, as the training loader runs it
    loader = DataLoader(Subset(ds, [0, 1]), batch_size=2, num_workers=1, collate_fn=collate_encoded)
    (batch, labels, skipped), = list(loader)
    assert [tuple(t.shape) for t in batch.items()] == [tuple(first.shape), (3, 30, 41)] and skipped == 0


def test_encoded_items_from_parquet_shards_and_a_null_row(tmp_path: Path):
    blob = _jpeg(3, (50, 40))
    table = pa.table({"image": pa.array([blob, None], pa.binary()), "label": pa.array([4, 5], pa.int32())})
    pq.write_table(table, tmp_path / "train.parquet")
    ds = encoded_train_dataset(ParquetImages(fsspec.filesystem("file"), [str(tmp_path / "train.parquet")]))
    data, label, skipped = ds[0]
    assert bytes(data.numpy()) == blob and label == 4 and skipped == 0
    assert ds[1][2] == 1  # the null row is skipped and counted


def test_gpu_decode_names_the_setting_for_datasets_of_decoded_images():
    ds = TensorImages(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2))
    with pytest.raises(ValueError, match="data.decode='gpu'.*imagefolder.*parquet"):
        encoded_train_dataset(ds)
