"""Ray Data ingest for pretraining: sample ids shuffled per pass, then Ray Data tasks (placed by resources) read,
decode and make the two MoCo views with the torch path's own readers and augmentation code."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.augment import AugmentSpec, BatchAugment, two_view_transform
from .base import SkipCorrupt, to_uint8_tensor

COLUMNS = ("id", "view_q", "view_k", "replaced")

_datasets: dict[str, Dataset] = {}  # per ingest process: the training set fetched once from the object store


def batch_seed(run_seed: int, ids: np.ndarray) -> int:
    """The augmentation seed of one ingest batch: fixed by the run's seed and the batch's samples in their order,
    so a pass with the same order draws the same views, and no two ingest processes share a random stream."""
    digest = hashlib.blake2b(np.ascontiguousarray(ids, dtype=np.int64).tobytes(), digest_size=8,
                             key=str(run_seed).encode()).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def make_two_views(dataset: Dataset, ids: np.ndarray, spec: AugmentSpec, augment: str, run_seed: int
                   ) -> dict[str, np.ndarray]:
    """The ingest batch for samples `ids`: two float32 views each, and `replaced` (1 where the sample was corrupt
    and the next readable one stands in, as `SkipCorrupt` does on the torch path).

    augment "loader": torchvision per image from the full decoded image (`two_view_transform`); "device":
    the images resized to `spec.size`, then `BatchAugment` on the batch, as the training worker does on the
    torch path (here on the ingest node's CPU).
    """
    items = SkipCorrupt(dataset)
    seed = batch_seed(run_seed, ids)
    replaced = np.zeros(len(ids), dtype=np.int64)
    if augment == "loader":
        from torchvision.transforms.functional import to_pil_image

        transform = two_view_transform(spec)
        torch.manual_seed(seed)  # torchvision draws from the global RNG of this ingest process
        views_q, views_k = [], []
        for n, i in enumerate(ids):
            img, _label, replaced[n] = items[int(i)]
            q, k = transform(to_pil_image(img) if isinstance(img, torch.Tensor) else img)
            views_q.append(q)
            views_k.append(k)
        view_q, view_k = torch.stack(views_q), torch.stack(views_k)
    else:
        images = []
        for n, i in enumerate(ids):
            img, _label, replaced[n] = items[int(i)]
            images.append(to_uint8_tensor(img, spec.size))
        view_q, view_k = BatchAugment(spec).two_views(torch.stack(images), torch.Generator().manual_seed(seed))
    return {"id": np.asarray(ids, dtype=np.int64), "view_q": view_q.numpy(), "view_k": view_k.numpy(),
            "replaced": replaced}


def _views_fn(dataset_ref: Any, spec: AugmentSpec, augment: str, run_seed: int
              ) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    def views(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        key = dataset_ref.hex()
        if key not in _datasets:
            _datasets[key] = ray.get(dataset_ref)
        return make_two_views(_datasets[key], batch["id"], spec, augment, run_seed)

    return views


def ingest_dataset(dataset: Dataset, samples_per_pass: int, spec: AugmentSpec, augment: str, run_seed: int,
                   num_cpus: float, resources: dict[str, float], batch_rows: int):
    """A Ray Dataset of `samples_per_pass` two-view rows (COLUMNS) per pass over `dataset`.

    Each pass (epoch) shuffles all sample ids with a seed drawn from `run_seed` and the pass number, keeps the
    first `samples_per_pass` (whole global batches), and decodes and augments them in `map_batches` tasks that
    hold `num_cpus` and `resources` (so a custom resource pins them to ingest nodes). The shuffle runs under the
    same resources; it moves ids only.
    """
    import ray
    from ray.data import RandomSeedConfig

    remote_args: dict[str, Any] = {"num_cpus": num_cpus, **({"resources": resources} if resources else {})}
    ids = ray.data.range(len(dataset))  # type: ignore[arg-type]
    ids = ids.random_shuffle(seed=RandomSeedConfig(seed=run_seed, reseed_after_execution=True), **remote_args)
    views = _views_fn(ray.put(dataset), spec, augment, run_seed)
    return ids.limit(samples_per_pass).map_batches(views, batch_size=batch_rows, batch_format="numpy", **remote_args)
