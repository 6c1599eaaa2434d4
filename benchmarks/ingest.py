"""Pairs of MoCo views delivered to a training loop: the torch DataLoader path against Ray Data ingest.

The script writes a folder of ImageNet-like JPEGs (random sizes around 400 x 350, smooth content, quality 90)
and feeds both paths from it with the pretraining job's own code:

* torch: `jobs.pretrain.views.train_loader` (an `ImageFolderFS`, `data.augment: loader`, `--loader-workers`
  DataLoader processes) and `two_views`, in this process, as one Ray Train worker runs it.
* ray: `data.ray_ingest.ingest_dataset` (each epoch's order, then read + decode + `two_view_transform` in
  `map_batches` tasks of 1 CPU, served in order as Ray Train serves it) on a local Ray of `--ray-cpus` CPUs,
  consumed by `iter_torch_batches` here.

The consumer takes each batch's two views and sums them (no model: what is measured is what the data path
delivers). Reported per path and image size, after `--warmup` batches: pairs/s delivered, and CPU seconds per
pair of the whole process tree (this process, its DataLoader workers, or Ray's raylet, workers and daemons),
i.e. the cores one pair/s costs. Then, on a two-node Ray (`ray.cluster_utils.Cluster` on this machine: a head
where the consumer runs, and a node started with the custom resource `ingest`), the same pipeline with
`data.ingest.resources: {ingest: 1}` and the node each map task ran on (Ray's state API).

`--smoke` (what the tests run): 48 small images, batches of 8, the same code path and tables; `--address` joins
a running Ray for the side-by-side rows (the two-node part always starts its own).
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

from _bench import ensure_mocoray_importable, machine_line, parse_with_smoke, table, tree_cpu_seconds

ensure_mocoray_importable()


def make_jpegs(folder: Path, count: int, side: int, seed: int = 0) -> None:
    """`count` JPEGs of about side x 0.85 side (each size drawn +-20%) under folder/<class>/, 4 classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = (int(side * f) for f in rng.uniform(0.8, 1.2, 2) * (1.0, 0.85))
        coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        (folder / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        img.save(folder / f"c{i % 4}" / f"{i:06d}.jpg", quality=90)


def config(size: int, batch: int, loader_workers: int):
    from mocoray.config import load_config

    return load_config(None, ["data.name=imagefolder", "data.root=unused", "data.augment=loader",
                              f"data.image_size={size}", f"optim.batch_size={batch}",
                              f"data.loader_workers={loader_workers}"])


def consume(batches, warmup: int, limit: int) -> tuple[float, float, int]:
    """(pairs/s, CPU s per pair, pairs) over the batches after the first `warmup` ones (at most `limit`)."""
    pairs, t0, cpu0 = 0, 0.0, 0.0
    for n, (q, k) in enumerate(batches):
        if n == warmup:
            t0, cpu0 = time.perf_counter(), tree_cpu_seconds(os.getpid(), reaped=True)
        if n >= warmup:
            float(q.sum() + k.sum())
            pairs += q.shape[0]
        if n + 1 >= warmup + limit:
            break
    wall, cpu = time.perf_counter() - t0, tree_cpu_seconds(os.getpid(), reaped=True) - cpu0
    return pairs / wall, cpu / max(pairs, 1), pairs


def torch_batches(train, size: int, batch: int, workers: int):
    import torch

    from mocoray.jobs.pretrain.views import train_loader, two_views

    cfg = config(size, batch, workers)
    loader, sampler = train_loader(cfg, train, 0, 1)
    views = two_views(cfg)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for x, _labels, _skipped in loader:
            q, k, _ = views(x, torch.device("cpu"))
            yield q, k
        epoch += 1


def ray_dataset(train, size: int, batch: int, resources: dict[str, float]):
    """The pipeline and its `PassClock` (the epoch of each pass), executed in order as Ray Train executes it."""
    from mocoray.data.ray_ingest import ingest_dataset, start_clock
    from mocoray.jobs.pretrain.views import augment_spec

    cfg = config(size, batch, 0)
    clock = start_clock()
    ds = ingest_dataset(train, len(train) // batch * batch, augment_spec(cfg), "loader", 0, 1.0, resources,
                        batch_rows=batch, global_batch=batch, clock=clock)
    ds.context.execution_options.preserve_order = True
    return ds, clock


def ray_batches(train, size: int, batch: int, prefetch: int):
    import ray

    ds, clock = ray_dataset(train, size, batch, {})
    epoch = 0
    while True:
        ray.get(clock.set.remote(epoch, 0))
        for b in ds.iter_torch_batches(batch_size=batch, drop_last=True, prefetch_batches=prefetch):
            yield b["view_q"], b["view_k"]
        epoch += 1


def compare(args, train) -> list[list[str]]:
    import ray

    rows = []
    for size in args.sizes:
        runs = [(f"torch, {args.loader_workers} loader workers",
                 lambda size=size: torch_batches(train, size, args.batch, args.loader_workers)),
                (f"ray data, {int(ray.cluster_resources()['CPU'])} CPUs", lambda size=size: ray_batches(train, size, args.batch, 2))]
        for name, make in runs:
            batches = make()
            pps, cpu_per_pair, pairs = consume(batches, args.warmup, args.batches)
            batches.close()  # ends this row's DataLoader workers before the next row is timed
            del batches
            gc.collect()
            rows.append([name, str(size), f"{pps:.0f}", f"{cpu_per_pair * 1000:.1f}", str(pairs)])
            print(rows[-1], flush=True)
    ray.shutdown()
    return rows


def on_two_nodes(args, train) -> list[list[str]]:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_tasks

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
    ingest = cluster.add_node(num_cpus=2, resources={"ingest": 2})
    try:
        context = ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        ds, _clock = ray_dataset(train, args.sizes[-1], args.batch, {"ingest": 1})
        pairs = sum(b["view_q"].shape[0] for b in ds.iter_torch_batches(batch_size=args.batch, drop_last=True))
        # this cluster's own state API, not whichever Ray the environment points at
        state_api = f"http://{context.dashboard_url}"
        maps = [t for t in list_tasks(address=state_api, limit=10000, raise_on_missing_output=False)
                if t.name.startswith("MapBatches(views)")]
        head_id, ingest_id = cluster.head_node.node_id, ingest.node_id
        consumer = ray.get_runtime_context().get_node_id()
        return [[role, node_id[:12], str(sum(t.node_id == node_id for t in maps)),
                 str(pairs) if node_id == consumer else "0"]
                for role, node_id in (("head (the consumer)", head_id), ("ingest node", ingest_id))]
    finally:
        ray.shutdown()
        cluster.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--side", type=int, default=400, help="typical JPEG width (ImageNet's is ~400)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 32], help="view sizes (224, the demo's 32)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=24, help="timed batches per row (3 passes at the defaults)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/mocoray-ingest-jpegs"))
    parser.add_argument("--address", help="join this Ray for the side-by-side rows instead of starting one")
    parser.add_argument("--no-two-nodes", action="store_true",
                        help="leave out the two-node run (the tests prove placement in tests/test_ray_ingest.py)")
    args = parse_with_smoke(parser, argv, images=48, side=96, sizes=[64, 32], batch=8, batches=2, warmup=1,
                            loader_workers=1, folder=Path("/tmp/mocoray-ingest-jpegs-smoke"))
    import fsspec
    import ray

    from mocoray.data.external import ImageFolderFS

    if not args.folder.exists() or sum(1 for _ in args.folder.rglob("*.jpg")) != args.images:
        make_jpegs(args.folder, args.images, args.side)
    train = ImageFolderFS(fsspec.filesystem("file"), str(args.folder))
    print(machine_line())
    print(f"{len(train)} JPEGs of ~{args.side} px in {args.folder}; batches of {args.batch}, {args.batches} timed "
          f"after {args.warmup}\n")
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False)
    rows = compare(args, train)
    print(table(["path", "view px", "pairs/s", "CPU ms/pair", "pairs timed"], rows))
    if not args.no_two_nodes:
        print()
        print(table(["node", "node id", "map tasks", "pairs consumed"], on_two_nodes(args, train)))


if __name__ == "__main__":
    main()
