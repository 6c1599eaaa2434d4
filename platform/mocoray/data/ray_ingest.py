"""Ray Data ingest for pretraining: each pass serves one epoch in the torch path's global order
(`epoch_permutation`), and Ray Data tasks (placed by resources) read, decode and make the two MoCo views with the
torch path's own readers and augmentation code."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.augment import AugmentSpec, BatchAugment, two_view_transform
from .base import SkipCorrupt, to_uint8_tensor
from .sampler import epoch_permutation

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


class PassClock:
    """Which (epoch, first step) the next pass of the ingest pipeline serves (a Ray actor, one per run).

    Ray Data executes the dataset once per epoch without saying which epoch it is, and its own per-execution
    seed counts executions of this attempt: the training workers, which know the epoch, set it here before
    each pass, and the pass's tasks read it."""

    def __init__(self) -> None:
        self._pass = (0, 0)

    def set(self, epoch: int, start_step: int) -> None:
        self._pass = (epoch, start_step)

    def get(self) -> tuple[int, int]:
        return self._pass


def start_clock():
    """The run's `PassClock`, on the driver's node: a restarted clock would have forgotten the epoch, and the run
    ends with that node anyway, not with a (spot) worker or ingest node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # no CPU: it must never wait for a slot the training workers or the ingest tasks hold
    return ray.remote(num_cpus=0, scheduling_strategy=here)(PassClock).remote()


_orders: dict[tuple[int, int, int], np.ndarray] = {}  # per ingest process: the latest epoch's order


def pass_order(num_images: int, run_seed: int, epoch: int) -> np.ndarray:
    """Epoch `epoch`'s sample ids in training order: the torch path's `epoch_permutation`."""
    key = (num_images, run_seed, epoch)
    if key not in _orders:
        _orders.clear()
        _orders[key] = epoch_permutation(num_images, run_seed, epoch).numpy()
    return _orders[key]


def _views_fn(dataset_ref: Any, clock: Any, spec: AugmentSpec, augment: str, run_seed: int, samples_per_pass: int,
              batch_rows: int, global_batch: int) -> Callable[[dict[str, np.ndarray]], Any]:
    def views(chunks: dict[str, np.ndarray]):
        import ray

        key = dataset_ref.hex()
        if key not in _datasets:
            _datasets[key] = ray.get(dataset_ref)
        dataset = _datasets[key]
        epoch, start_step = ray.get(clock.get.remote())
        order, first = pass_order(len(dataset), run_seed, epoch), start_step * global_batch
        for chunk in chunks["chunk"]:
            lo, hi = int(chunk) * batch_rows, min((int(chunk) + 1) * batch_rows, samples_per_pass)
            if hi <= first:
                continue  # trained before the checkpoint this attempt started from
            # the whole chunk, then the trained part dropped: its seed and views stay those of the epoch
            out = make_two_views(dataset, order[lo:hi], spec, augment, run_seed)
            yield {k: v[max(first - lo, 0):] for k, v in out.items()}

    return views


def ingest_dataset(dataset: Dataset, samples_per_pass: int, spec: AugmentSpec, augment: str, run_seed: int,
                   num_cpus: float, resources: dict[str, float], batch_rows: int, global_batch: int, clock: Any):
    """A Ray Dataset of two-view rows (COLUMNS): each pass is the epoch and first step `clock` holds, i.e.
    positions `start_step * global_batch` to `samples_per_pass` of that epoch's `pass_order`.

    The pass is cut into chunks of `batch_rows` positions, one map task each, holding `num_cpus` and
    `resources` (so a custom resource pins them to ingest nodes); a chunk's views are seeded by its sample ids
    (`batch_seed`), so every sample's views are a function of (run seed, epoch) however the pass was started.
    """
    import ray

    remote_args: dict[str, Any] = {"num_cpus": num_cpus, **({"resources": resources} if resources else {})}
    num_chunks = -(-samples_per_pass // batch_rows)
    # One block per chunk, whatever the cluster's size, so the blocks and hence Ray Train's split of them
    # across ranks (in order: see runtime.make_torch_trainer) are the same in every attempt; blocks made on the
    # driver, as a read stage would run (unpinned) on any node.
    chunks = ray.data.from_items([{"chunk": k} for k in range(num_chunks)], override_num_blocks=num_chunks)
    views = _views_fn(ray.put(dataset), clock, spec, augment, run_seed, samples_per_pass, batch_rows, global_batch)
    return chunks.map_batches(views, batch_size=1, batch_format="numpy", **remote_args)
