"""Ray Data ingest: each pass serves one epoch in the torch path's order, and Ray Data tasks (placed by
resources) read, decode and augment with the torch path's own readers and augmentation code.

Pretraining (`ingest_dataset`): two MoCo views per sample, in `epoch_permutation`'s global order. Linear
evaluation's augmented protocol (`rows_dataset` with `make_labelled_view` and `DistributedSamplerOrder`): one
view and the label per sample, each rank's rows those torch's `DistributedSampler` gives it. See docs/design.md,
"Ray Data ingest"."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.augment import AugmentSpec, BatchAugment, two_view_transform
from .base import SkipCorrupt, TensorImages, to_uint8_tensor
from .sampler import epoch_permutation

COLUMNS = ("id", "view_q", "view_k", "replaced")  # pretraining's rows
LABELLED_COLUMNS = ("id", "view", "label", "replaced")  # linear evaluation's rows

# (dataset, sample ids in order) -> the rows of those samples, one array per column
MakeRows = Callable[[Dataset, np.ndarray], dict[str, np.ndarray]]

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


def make_labelled_view(dataset: Dataset, ids: np.ndarray, spec: AugmentSpec, transform: Callable | None,
                       run_seed: int) -> dict[str, np.ndarray]:
    """The ingest batch of linear evaluation's augmented protocol for samples `ids`: one float32 view each, its
    label, and `replaced` (as `make_two_views`).

    `transform` (the protocol's per-image torchvision transform) makes each view from the full decoded image, as
    the torch path's loader does; None: `BatchAugment(spec)` on the stored images of an in-memory set, as the
    torch path does on the device with `data.augment: device` (here on the ingest node's CPU).
    """
    items = SkipCorrupt(dataset)
    seed = batch_seed(run_seed, ids)
    replaced = np.zeros(len(ids), dtype=np.int64)
    labels = np.zeros(len(ids), dtype=np.int64)
    images = []
    for n, i in enumerate(ids):
        img, labels[n], replaced[n] = items[int(i)]
        images.append(img)
    if transform is not None:
        from torchvision.transforms.functional import to_pil_image

        torch.manual_seed(seed)  # torchvision draws from the global RNG of this ingest process
        view = torch.stack([transform(to_pil_image(img) if isinstance(img, torch.Tensor) else img) for img in images])
    else:
        if not isinstance(dataset, TensorImages):
            raise TypeError("batched augmentation needs an in-memory set (TensorImages); give a per-image transform")
        view = BatchAugment(spec)(torch.stack(images), torch.Generator().manual_seed(seed))
    return {"id": np.asarray(ids, dtype=np.int64), "view": view.numpy(), "label": labels, "replaced": replaced}


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


@dataclass(frozen=True)
class GlobalOrder:
    """Pretraining's epoch order: `epoch_permutation(num_images, run_seed, epoch)` (its `GlobalBatchSampler`'s:
    rank r's part of step s is positions s·B + r·b to s·B + (r+1)·b)."""

    run_seed: int

    def __call__(self, num_images: int, epoch: int) -> np.ndarray:
        return epoch_permutation(num_images, self.run_seed, epoch).numpy()


@dataclass(frozen=True)
class DistributedSamplerOrder:
    """Linear evaluation's epoch order: what torch's `DistributedSampler(shuffle=True, seed)` gives each of
    `world` ranks (rank r: `randperm(N, seed + epoch)[r::world]`), cut to whole steps of `per_rank_batch` per
    rank, then dealt in chunks of `batch_rows` to the ranks in turn, the order in which the ordered split hands
    one-chunk blocks to them. Where `batch_rows` divides `per_rank_batch` every rank thus gets exactly its
    sampler's batches; otherwise the epoch still trains the same samples (the first whole steps of the
    permutation), spread differently across ranks and steps."""

    seed: int
    world: int
    per_rank_batch: int
    batch_rows: int

    def __call__(self, num_images: int, epoch: int) -> np.ndarray:
        perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(self.seed + epoch)).numpy()
        rows = num_images // (self.per_rank_batch * self.world) * self.per_rank_batch  # per rank, whole steps
        shards = perm[: rows * self.world].reshape(rows, self.world).T  # shards[r]: rank r's samples in order
        return np.concatenate([shards[r, q:q + self.batch_rows] for q in range(0, rows, self.batch_rows)
                               for r in range(self.world)] or [perm[:0]])


_orders: dict[tuple[Any, int, int], np.ndarray] = {}  # per ingest process: the latest epoch's order


def cached_order(order: Callable[[int, int], np.ndarray], num_images: int, epoch: int) -> np.ndarray:
    """`order(num_images, epoch)`, computed once per ingest process and epoch."""
    key = (order, num_images, epoch)
    if key not in _orders:
        _orders.clear()
        _orders[key] = order(num_images, epoch)
    return _orders[key]


def _views_fn(dataset_ref: Any, clock: Any, make_rows: MakeRows, order: Callable[[int, int], np.ndarray],
              samples_per_pass: int, batch_rows: int, global_batch: int) -> Callable[[dict[str, np.ndarray]], Any]:
    def views(chunks: dict[str, np.ndarray]):
        import ray

        key = dataset_ref.hex()
        if key not in _datasets:
            _datasets[key] = ray.get(dataset_ref)
        dataset = _datasets[key]
        epoch, start_step = ray.get(clock.get.remote())
        ids, first = cached_order(order, len(dataset), epoch), start_step * global_batch
        for chunk in chunks["chunk"]:
            lo, hi = int(chunk) * batch_rows, min((int(chunk) + 1) * batch_rows, samples_per_pass)
            if hi <= first:
                continue  # trained before the checkpoint this attempt started from
            # the whole chunk, then the trained part dropped: its seed and views stay those of the epoch
            out = make_rows(dataset, ids[lo:hi])
            yield {k: v[max(first - lo, 0):] for k, v in out.items()}

    return views


def rows_dataset(dataset: Dataset, samples_per_pass: int, make_rows: MakeRows, order: Callable[[int, int], np.ndarray],
                 num_cpus: float, resources: dict[str, float], batch_rows: int, global_batch: int, clock: Any):
    """A Ray Dataset of `make_rows` rows: each pass is the epoch and first step `clock` holds, i.e. positions
    `start_step * global_batch` to `samples_per_pass` of `order(len(dataset), epoch)`.

    The pass is cut into chunks of `batch_rows` positions, one map task each, holding `num_cpus` and
    `resources` (so a custom resource pins them to ingest nodes); `make_rows` gets a chunk's sample ids (it
    seeds its augmentation by them: `batch_seed`), so every sample's views are a function of (run seed, epoch)
    however the pass was started.
    """
    import ray

    remote_args: dict[str, Any] = {"num_cpus": num_cpus, **({"resources": resources} if resources else {})}
    num_chunks = -(-samples_per_pass // batch_rows)
    # One block per chunk, whatever the cluster's size, so the blocks and hence Ray Train's split of them
    # across ranks (in order: see runtime.make_torch_trainer) are the same in every attempt; blocks made on the
    # driver, as a read stage would run (unpinned) on any node.
    chunks = ray.data.from_items([{"chunk": k} for k in range(num_chunks)], override_num_blocks=num_chunks)
    views = _views_fn(ray.put(dataset), clock, make_rows, order, samples_per_pass, batch_rows, global_batch)
    return chunks.map_batches(views, batch_size=1, batch_format="numpy", **remote_args)


def ingest_dataset(dataset: Dataset, samples_per_pass: int, spec: AugmentSpec, augment: str, run_seed: int,
                   num_cpus: float, resources: dict[str, float], batch_rows: int, global_batch: int, clock: Any):
    """Pretraining's Ray Dataset of two-view rows (COLUMNS) in `epoch_permutation`'s order (`rows_dataset`
    with `make_two_views`)."""
    make_rows = partial(make_two_views, spec=spec, augment=augment, run_seed=run_seed)
    return rows_dataset(dataset, samples_per_pass, make_rows, GlobalOrder(run_seed), num_cpus, resources,
                        batch_rows, global_batch, clock)


class ShardLoader:
    """A rank's batches from its Ray Data shard, shaped like its torch path's loader: `item(batch)` per batch,
    `len()` steps left in the epoch, and `sampler` for the epoch.

    `set_epoch` tells the pipeline (through its `PassClock`) which epoch and first step the next pass serves:
    the epoch's order from that step on, as on the torch path (see docs/design.md, "Ray Data ingest").
    Every rank's shard holds the same number of rows (Ray Train splits with equal=True, and the pass holds whole
    global batches only), so every rank takes the same number of steps.
    """

    def __init__(self, shard, clock, per_rank_batch: int, steps_per_epoch: int, prefetch_batches: int,
                 item: Callable[[dict], Any]) -> None:
        self.shard, self.clock, self.per_rank_batch, self.item = shard, clock, per_rank_batch, item
        self.steps_per_epoch, self.prefetch_batches, self.start_step = steps_per_epoch, prefetch_batches, 0
        self.sampler = self

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        import ray

        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside an epoch of {self.steps_per_epoch} steps")
        self.start_step = start_step
        # Every rank sets the same values; the pass starts only once all ranks ask for it (and the previous one
        # ended, all its tasks done, before any rank saw its end), so its tasks all read these.
        ray.get(self.clock.set.remote(epoch, start_step))

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        batches = self.shard.iter_torch_batches(batch_size=self.per_rank_batch, drop_last=True,
                                                prefetch_batches=self.prefetch_batches)
        for step, batch in enumerate(batches):
            if step < len(self):  # read to the end, so that every rank's next pass starts from a finished one
                yield self.item(batch)
