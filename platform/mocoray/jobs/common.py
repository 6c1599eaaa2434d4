"""Pieces every Ray job shares: Ray start-up, paths workers can use, schedules, feature extraction."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from ..core.augment import normalize_batch
from ..data.base import Resized, SkipCorrupt, TensorImages, collate_batch

_progress = logging.getLogger("mocoray.progress")


def console(message: str) -> None:
    """One line for the person watching the job (Ray forwards worker logs to the driver's console)."""
    _progress.info(message)


def quiet_ray_worker_logs() -> None:
    """Ray Train logs every report at INFO; our per-epoch line already says what matters."""
    _progress.setLevel(logging.INFO)
    try:
        from ray.train.v2._internal.execution import context  # its logger is named after its file

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: keep its logs
        pass


def absolute_storage(path: str) -> str:
    """Local storage paths made absolute (Ray workers run in scratch dirs); URLs left alone."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def init_ray(address: str | None = None) -> None:
    """Connect to `address`/$RAY_ADDRESS, or start a local Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        port = free_port()
        with local_cluster_env(port):
            ray.init(dashboard_host="127.0.0.1", dashboard_port=port)  # the dashboard cleans up stopped trials' resources


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_cluster_env(dashboard_port: int):
    """Environment for the processes of a local Ray being started: where its own API server is.

    Ray Train's placement-group cleaner (which frees the workers of a stopped Tune trial) finds its
    cluster by auto-detection, and that fails when several Ray instances share the host. Ray's
    processes inherit the environment at start-up; the caller's own environment is restored after.
    """
    key = "RAY_API_SERVER_ADDRESS"
    old = os.environ.get(key)
    os.environ[key] = f"http://127.0.0.1:{dashboard_port}"
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def lr_at(epoch_progress: float, base_lr: float, epochs: int, schedule: str, warmup_epochs: int,
          milestones: list[int], gamma: float) -> float:
    """Learning rate at a fractional epoch: linear warm-up, then cosine / step / constant."""
    if warmup_epochs and epoch_progress < warmup_epochs:
        return base_lr * (epoch_progress + 1e-3) / warmup_epochs
    if schedule == "cosine":
        span = max(epochs - warmup_epochs, 1e-8)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch_progress - warmup_epochs) / span))
    if schedule == "step":
        return base_lr * gamma ** sum(epoch_progress >= m for m in milestones)
    return base_lr


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def extract_features(
    backbone: torch.nn.Module,
    dataset: Dataset,
    device: torch.device,
    image_size: int,
    batch_size: int = 256,
    channels_last: bool = False,
    loader_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features and labels of every image, each rank doing a strided share (all-gathered).

    Returns the same full (N x D, N) tensors on every rank. The backbone runs in eval mode.
    """
    rank, world = rank_world()
    n = len(dataset)  # type: ignore[arg-type]
    per_rank = math.ceil(n / world)
    mine = [min(i, n - 1) for i in range(rank, per_rank * world, world)]  # padded to equal length
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    if isinstance(dataset, TensorImages):
        idx = torch.as_tensor(mine)
        batches = ((dataset.images[idx[i : i + batch_size]], dataset.labels[idx[i : i + batch_size]])
                   for i in range(0, len(mine), batch_size))
    else:
        from torch.utils.data import Subset

        loader = DataLoader(Subset(Resized(SkipCorrupt(dataset), image_size), mine), batch_size=batch_size,
                            num_workers=loader_workers, collate_fn=collate_batch)
        batches = ((x, y) for x, y, _ in loader)
    for images, y in batches:
        x = normalize_batch(images.to(device, non_blocking=True), size=image_size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats.append(backbone(x).float())
        labels.append(y.to(device))
    backbone.train(was_training)
    f, y = torch.cat(feats), torch.cat(labels)
    if world > 1:
        fs = [torch.empty_like(f) for _ in range(world)]
        ys = [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(fs, f)
        dist.all_gather(ys, y)
        # element j of rank r is image r + j * world: interleave back to dataset order
        f = torch.stack(fs, dim=1).reshape(-1, f.shape[1])[:n]
        y = torch.stack(ys, dim=1).reshape(-1)[:n]
    return f, y


def ddp_kwargs() -> dict:
    """DDP options for MoCo: no buffer broadcast on every forward.

    The queue (K x dim) and the key encoder are buffers/frozen; every rank keeps them identical by
    construction, so re-broadcasting them each step would only cost bandwidth. Parameters and buffers
    are still synced once at construction. torch >= 2.10 renamed the option.
    """
    import inspect

    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


# ---------------------------------------------------------------------------------------------------
# Driver plumbing shared by the Ray Train jobs

STATUS_FILE = "mocoray_status.json"  # how a job's rank 0 tells the driver how it ended


def fs_exists(url: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def write_status(status_url: str, status: dict) -> None:
    import json

    import fsspec

    with fsspec.open(status_url, "w") as f:
        json.dump(status, f)


def read_status(status_url: str) -> dict | None:
    import json

    import fsspec

    if not fs_exists(status_url):
        return None
    with fsspec.open(status_url, "r") as f:
        return json.load(f)


def prepare_run_dir(run_dir: str, name: str, resume: bool) -> str:
    """Check that the run is new (or, with `resume`, that it exists), create it, clear a stale status.

    A run name is a key: Ray Train continues whatever run it finds under the same name, so running a
    name again by accident would silently resume it. Returns the URL of the run's status file.
    """
    import fsspec

    exists = fs_exists(run_dir)
    if exists and not resume:
        raise FileExistsError(f"run {name!r} already exists at {run_dir}; pass --resume to continue it, "
                              "or --set run.name=<new name> for a new run")
    if resume and not exists:
        raise FileNotFoundError(f"--resume: no run {name!r} at {run_dir} to continue")
    fs, path = fsspec.core.url_to_fs(run_dir)
    fs.makedirs(path, exist_ok=True)
    status_url = run_dir + "/" + STATUS_FILE
    if fs_exists(status_url):  # a resumed run's old status says nothing about this attempt
        fs.rm(fsspec.core.url_to_fs(status_url)[1])
    return status_url


def make_torch_trainer(train_fn, loop_config: dict, run, storage: str, callbacks: list | None = None):
    """A TorchTrainer for `run` (a config.RunConfig): workers, resources, storage, failures, checkpoints."""
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = {"CPU": run.cpus_per_worker}
    if run.use_gpu:
        resources["GPU"] = run.gpus_per_worker
    return TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.keep_checkpoints),
            callbacks=callbacks,
        ),
    )


def checkpoint_url(result, storage: str) -> str | None:
    """The final checkpoint of a Ray Train result as a path or URL the user can pass on."""
    if not result.checkpoint:
        return None
    path = result.checkpoint.path
    if "://" in storage:
        return path if "://" in path else storage.split("://", 1)[0] + "://" + path
    return path if path.startswith("/") else "/" + path
