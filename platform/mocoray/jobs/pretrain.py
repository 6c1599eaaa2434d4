"""MoCo pretraining as a Ray Train job: `run_pretrain` (driver) and `train_loop_per_worker` (workers).

Driver: validated config -> MLflow run -> TorchTrainer(ScalingConfig, RunConfig) -> fit -> export.
Worker: data shard -> MoCo (DDP for the query encoder) -> epochs of `train_one_epoch` (the core MoCo
step) -> `evaluate_knn` monitor -> report metrics (+ checkpoint) to Ray; rank 0 logs to MLflow.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from .. import __version__, storage
from ..checkpoints import restore_training_checkpoint, save_training_checkpoint
from ..config import PretrainConfig, flatten
from ..core.amp import AMP_DTYPES
from ..core.augment import BatchAugment, moco_spec, two_view_transform
from ..core.backbones import build_backbone
from ..core.compiled import compile_encoders, make_sgd
from ..core.distributed import all_reduce_sum
from ..core.features import extract_features
from ..core.knn import knn_top1
from ..core.moco import Encoder, MoCo, NonFiniteLossError, train_step, unwrap
from ..core.schedule import lr_at
from ..core.shuffle_bn import resolve_bn_mode
from ..data import PretrainData, build_pretrain_data, check_paths, image_batches
from ..data.base import Resized, SkipCorrupt, TensorImages, Transformed, collate_batch
from ..data.device_decode import DeviceJpegAugment, collate_encoded, encoded_train_dataset
from ..encoders import export_backbone
from ..gpu_metrics import gpu_monitor
from ..tracking import (
    BACKBONE_TAG,
    CHECKPOINT_TAG,
    JOB_TAG,
    RUN_DIR_TAG,
    STATUS_TAG,
    MetricLogger,
    resolve_tracking_uri,
    start_run,
)
from . import runtime
from .faults import Faults

# ---------------------------------------------------------------------------------------------------
# Worker: building blocks


def build_moco(cfg: PretrainConfig, bn_mode: str) -> MoCo:
    backbone, feat_dim = build_backbone(cfg.model.arch, cfg.model.cifar_stem)
    encoder = Encoder(backbone, feat_dim, cfg.moco.dim, cfg.moco.use_mlp)
    model = MoCo(encoder, cfg.moco.queue_size, cfg.moco.momentum, cfg.moco.temperature, bn_mode, cfg.moco.num_splits)
    if bn_mode == "sync":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def train_loader(cfg: PretrainConfig, dataset, rank: int, world: int) -> tuple[DataLoader, DistributedSampler]:
    """Batches of encoded files (GPU decode), uint8 images (device augmentation) or of two augmented views
    (loader augmentation)."""
    collate = collate_batch
    if cfg.data.decode == "gpu":
        dataset, collate = encoded_train_dataset(dataset), collate_encoded
    elif cfg.data.augment == "loader":
        spec = moco_spec(cfg.moco.version, cfg.data.image_size, cfg.data.blur, (cfg.data.crop_min_scale, 1.0))
        dataset = Transformed(SkipCorrupt(dataset), two_view_transform(spec))
    elif not isinstance(dataset, TensorImages):
        dataset = Resized(SkipCorrupt(dataset), cfg.data.image_size)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.run.seed, drop_last=True)
    loader = DataLoader(
        dataset,
        batch_size=cfg.optim.batch_size // world,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.data.loader_workers,
        collate_fn=collate,
        pin_memory=cfg.run.use_gpu,
        persistent_workers=cfg.data.loader_workers > 0,
    )
    return loader, sampler


TwoViews = Callable[[Any, torch.device], tuple[torch.Tensor, torch.Tensor, int]]


def two_views(cfg: PretrainConfig) -> TwoViews:
    """batch -> (im_q, im_k, images replaced) on the device, for whatever `train_loader` serves."""
    spec = moco_spec(cfg.moco.version, cfg.data.image_size, cfg.data.blur, (cfg.data.crop_min_scale, 1.0))
    if cfg.data.decode == "gpu":
        return DeviceJpegAugment(spec).two_views
    if cfg.data.augment == "device":
        augment = BatchAugment(spec)
        return lambda x, device: (*augment.two_views(x.to(device, non_blocking=True)), 0)
    return lambda x, device: (x[0].to(device, non_blocking=True), x[1].to(device, non_blocking=True), 0)


@dataclass
class TrainState:
    """What a checkpoint carries besides model, optimizer and scaler."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    knn_top1_init: float | None = None  # the same encoder at random init: every run's own baseline
    knn_top1_last: float | None = None


@dataclass
class EpochStats:
    loss: float
    contrastive_acc: float
    lr: float
    steps: int
    train_time_s: float
    corrupt_images_skipped: int = 0


def train_one_epoch(model, loader, optimizer, scaler, views: TwoViews, cfg: PretrainConfig,
                    epoch: int, state: TrainState, device: torch.device, channels_last: bool, rank: int,
                    faults: Faults) -> EpochStats:
    """One epoch of MoCo steps; raises NonFiniteLossError on every rank at once if the loss blows up."""
    model.train()
    steps = len(loader)
    lr = cfg.optim.effective_lr
    amp_dtype = AMP_DTYPES[cfg.run.amp]
    t0 = time.perf_counter()
    loss_sum = acc_sum = 0.0
    skipped = 0
    cur_lr = lr
    for i, (x, _labels, n_skipped) in enumerate(loader):
        if i == 1:
            faults.maybe_crash(epoch, rank)
        cur_lr = lr_at(epoch + i / steps, lr, cfg.optim.epochs, cfg.optim.schedule, cfg.optim.warmup_epochs,
                       cfg.optim.milestones, cfg.optim.gamma)
        for group in optimizer.param_groups:
            group["lr"] = cur_lr
        im_q, im_k, replaced = views(x, device)
        skipped += int(n_skipped) + replaced
        if channels_last:
            im_q = im_q.contiguous(memory_format=torch.channels_last)
            im_k = im_k.contiguous(memory_format=torch.channels_last)
        im_q = faults.poison(im_q, state.global_step, rank)
        res = train_step(model, im_q, im_k, optimizer, scaler, amp_dtype, cfg.optim.clip_grad_norm)
        loss_sum += res.loss
        acc_sum += res.accuracy
        state.global_step += 1
    (skipped,) = all_reduce_sum([skipped], device)  # every rank joins, skipped images or not
    return EpochStats(loss=loss_sum / steps, contrastive_acc=acc_sum / steps, lr=cur_lr, steps=steps,
                      train_time_s=time.perf_counter() - t0, corrupt_images_skipped=int(skipped))


def evaluate_knn(backbone: torch.nn.Module, data: PretrainData, cfg: PretrainConfig, device: torch.device,
                 channels_last: bool) -> float:
    """Weighted kNN top-1 of the backbone's features: the labelled bank votes for each val image."""
    bank = data.knn_bank
    if cfg.knn.max_bank and len(bank) > cfg.knn.max_bank and isinstance(bank, TensorImages):
        bank = bank.subset(torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))[: cfg.knn.max_bank])
    size = cfg.data.image_size

    def features(dataset):
        return extract_features(
            backbone, len(dataset),
            lambda idx: image_batches(dataset, idx, 256, size, cfg.data.loader_workers),
            device, size, channels_last,
        )

    bank_f, bank_y = features(bank)
    val_f, val_y = features(data.knn_val)
    return knn_top1(bank_f, bank_y, val_f, val_y, cfg.knn.k, cfg.knn.temperature)


def epoch_metrics(state: TrainState, stats: EpochStats, cfg: PretrainConfig, epoch_time_s: float) -> dict:
    return {
        "epoch": state.epoch,
        "loss": stats.loss,
        "contrastive_acc": stats.contrastive_acc,
        "knn_top1": state.knn_top1_last,
        "knn_top1_init": state.knn_top1_init,
        "knn_margin": state.knn_top1_last - state.knn_top1_init,
        "lr": stats.lr,
        "pairs_per_s": stats.steps * cfg.optim.batch_size / stats.train_time_s,
        "epoch_time_s": epoch_time_s,  # training and kNN
        "corrupt_images_skipped": stats.corrupt_images_skipped,
    }


def epoch_line(m: dict, cfg: PretrainConfig) -> str:
    return (f"epoch {m['epoch']}/{cfg.optim.epochs}  loss {m['loss']:.4f}  acc {m['contrastive_acc']:.3f}  "
            f"kNN {m['knn_top1']:.4f} ({m['knn_margin']:+.4f} vs init)  lr {m['lr']:.4g}  "
            f"{m['pairs_per_s']:.0f} pairs/s  {m['epoch_time_s']:.1f}s")


def report_nonfinite_loss(err: NonFiniteLossError, epoch: int, state: TrainState, rank: int, status_url: str,
                          logger: MetricLogger | None) -> None:
    """Every rank raised at the same step (the check is all-reduced). No checkpoint is written from here on:
    the last good one stays the run's latest."""
    if rank == 0:
        runtime.write_status(status_url, {"status": "nonfinite_loss", "epoch": epoch + 1, "step": state.global_step,
                                          "message": str(err)})
        if logger:
            logger.tags({STATUS_TAG: "nonfinite_loss"})
        runtime.console(f"stopping: {err} at epoch {epoch + 1}, step {state.global_step}")


def save_checkpoint(model, optimizer, scaler, state: TrainState, cfg: PretrainConfig, metrics: dict, rank: int,
                    world: int, bn_mode: str, epoch_no: int) -> None:
    """Report `metrics` to Ray with a checkpoint: every rank writes its RNG state, rank 0 the rest."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        save_training_checkpoint(
            tmp,
            rank=rank,
            model_state=unwrap(model).state_dict() if rank == 0 else None,
            optimizer_state=optimizer.state_dict() if rank == 0 else None,
            scaler_state=scaler.state_dict() if rank == 0 else None,
            train_state=vars(state),
            meta={"config": cfg.model_dump(mode="json"), "metrics": metrics, "bn_mode_effective": bn_mode,
                  "world_size": world, "mocoray": __version__, "torch": torch.__version__},
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"epoch_{epoch_no:04d}")


def restore(checkpoint, model, optimizer, scaler, rank: int) -> TrainState:
    with checkpoint.as_directory() as ckpt_dir:
        return TrainState(**restore_training_checkpoint(ckpt_dir, rank, model, optimizer, scaler))


# ---------------------------------------------------------------------------------------------------
# Worker: the loop


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = PretrainConfig.model_validate(loop_config["cfg"])
    faults = Faults(**loop_config["faults"])
    runtime.quiet_ray_worker_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = runtime.worker_device(cfg.run)

    data = build_pretrain_data(cfg.data)
    if cfg.moco.queue_size >= len(data.train) and rank == 0:
        runtime.console(f"warning: moco.queue_size={cfg.moco.queue_size} >= {len(data.train)} training images: "
                "each image's own previous key will sit among its negatives; learning may stall")
    bn_mode = resolve_bn_mode(cfg.moco.bn_mode, world, device.type)
    torch.manual_seed(cfg.run.seed)  # identical initial model and queue on every rank
    model = build_moco(cfg, bn_mode).to(device)
    channels_last = cfg.run.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.run.compile:
        compile_encoders(model)
    optimizer = make_sgd(model.encoder_q.parameters(), cfg.optim.effective_lr, cfg.optim.sgd_momentum,
                         cfg.optim.weight_decay, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.run.amp == "fp16" and device.type == "cuda")
    torch.manual_seed(cfg.run.seed * 1000 + 1 + rank)  # augmentation randomness differs per rank

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(loop_config["resume_from"])
    state = TrainState()
    if checkpoint is not None:
        state = restore(checkpoint, model, optimizer, scaler, rank)
        if rank == 0:
            runtime.console(f"resumed from checkpoint after epoch {state.epoch} (step {state.global_step})")
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=runtime.ddp_kwargs())
    loader, sampler = train_loader(cfg, data.train, rank, world)
    if len(loader) == 0:
        raise ValueError(f"optim.batch_size={cfg.optim.batch_size} is larger than the {len(data.train)} training images")
    views = two_views(cfg)
    logger = MetricLogger(loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id")) if rank == 0 else None
    backbone = unwrap(model).encoder_q.backbone

    if state.knn_top1_init is None:
        state.knn_top1_init = state.knn_top1_last = evaluate_knn(backbone, data, cfg, device, channels_last)
        if logger:
            logger.metrics({"knn_top1": state.knn_top1_init, "knn_top1_init": state.knn_top1_init}, step=0)
            logger.tags({"mocoray.bn_mode_effective": bn_mode, "mocoray.world_size": world})
            runtime.console(f"{cfg.model.arch}, bn_mode {bn_mode} ({cfg.moco.bn_mode} requested), {world} worker(s), "
                    f"{len(data.train)} images, {len(loader)} steps/epoch; kNN top-1 at init {state.knn_top1_init:.4f}")

    with gpu_monitor(device) as monitor:  # GPU utilisation and memory next to pairs/s (nothing on CPUs)
        for epoch in range(state.epoch, cfg.optim.epochs):
            sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            try:
                stats = train_one_epoch(model, loader, optimizer, scaler, views, cfg, epoch, state, device,
                                        channels_last, rank, faults)
            except NonFiniteLossError as err:
                report_nonfinite_loss(err, epoch, state, rank, loop_config["status_url"], logger)
                return
            state.epoch = epoch + 1
            last = state.epoch == cfg.optim.epochs
            if state.epoch % cfg.knn.every == 0 or last:
                state.knn_top1_last = evaluate_knn(backbone, data, cfg, device, channels_last)
            metrics = epoch_metrics(state, stats, cfg, time.perf_counter() - t0) | monitor.epoch_averages()
            if logger:
                logger.metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=state.epoch)
                runtime.console(epoch_line(metrics, cfg))
            if state.epoch % cfg.run.checkpoint_every == 0 or last:
                save_checkpoint(model, optimizer, scaler, state, cfg, metrics, rank, world, bn_mode, state.epoch)
            else:
                ray.train.report(metrics)
    if rank == 0:
        runtime.write_status(loop_config["status_url"], {"status": "completed", "epoch": cfg.optim.epochs,
                                                  "step": state.global_step})


# ---------------------------------------------------------------------------------------------------
# Driver


@dataclass
class PretrainResult:
    run_dir: str
    checkpoint: str | None
    metrics: dict[str, Any]
    status: str
    mlflow_run_id: str | None
    tracking_uri: str | None
    backbone_path: str | None


class PretrainFailed(RuntimeError):
    """The job did not complete; `result` holds what it left behind (checkpoint, MLflow run), if anything."""

    def __init__(self, message: str, result: PretrainResult | None = None) -> None:
        super().__init__(message)
        self.result = result


def with_absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    """A copy whose local paths are absolute: Ray workers run in their own scratch directories."""
    cfg = cfg.model_copy(deep=True)
    for section, name in (("data", "root"), ("data", "val_root"), ("run", "storage_path")):
        obj = getattr(cfg, section)
        if getattr(obj, name):
            setattr(obj, name, storage.absolute(getattr(obj, name)))
    return cfg


def run_pretrain(
    cfg: PretrainConfig,
    address: str | None = None,
    resume: bool | str = False,
    resume_from: str | None = None,
    extra_tags: dict[str, str] | None = None,
    callbacks: list | None = None,
    faults: Faults | None = None,
) -> PretrainResult:
    """Run (or, with `resume`, continue) one pretraining job; returns where its results are.

    resume: False = the run must be new; True = it must exist; "auto" = continue it if it exists
    (what a restarted Tune trial wants). `extra_tags` go on the MLflow run (sweeps add their parent
    link); `callbacks` go to the trainer's RunConfig (sweeps add Tune's report forwarding); `faults`
    injects failures (tests only).
    """
    cfg = with_absolute_paths(cfg)
    check_paths(cfg.data)
    if resume == "auto":
        resume = storage.exists(storage.join(cfg.run.storage_path, cfg.run.name))
    try:
        job = runtime.JobRun.prepare(cfg.run, bool(resume))
    except (FileExistsError, FileNotFoundError) as err:
        raise PretrainFailed(str(err)) from None
    if cfg.tracking.enabled:
        uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
        tags = {JOB_TAG: "pretrain", RUN_DIR_TAG: job.run_dir, **(extra_tags or {})}
        job.open_tracking(uri, start_run, uri, cfg.tracking.experiment, cfg.run.name,
                          flatten(cfg.model_dump(mode="json")), tags, job.run_dir)

    runtime.init_ray(address)
    loop_config = job.loop_config(cfg=cfg.model_dump(mode="json"), resume_from=resume_from,
                                  faults=(faults or Faults()).to_dict())
    trainer = runtime.make_torch_trainer(train_loop_per_worker, loop_config, cfg.run, job.storage_path, callbacks)
    try:
        result = trainer.fit()
    except Exception as err:
        job.end_tracking("FAILED", {STATUS_TAG: "failed"})
        raise PretrainFailed(f"pretraining run {cfg.run.name!r} failed: {err}") from err

    status = job.status() or {"status": "unknown"}
    checkpoint = runtime.checkpoint_url(result, job.storage_path)
    backbone_path = None
    if checkpoint and status["status"] == "completed":
        backbone_path = storage.join(job.run_dir, "backbone.pt")
        export_backbone(checkpoint, backbone_path)
    final_tags = {STATUS_TAG: status["status"]}
    if checkpoint:
        final_tags[CHECKPOINT_TAG] = checkpoint
    if backbone_path:
        final_tags[BACKBONE_TAG] = backbone_path
    job.end_tracking("FINISHED" if status["status"] == "completed" else "FAILED", final_tags)
    out = PretrainResult(run_dir=job.run_dir, checkpoint=checkpoint, metrics=dict(result.metrics or {}),
                         status=status["status"], mlflow_run_id=job.mlflow_run_id, tracking_uri=job.tracking_uri,
                         backbone_path=backbone_path)
    if status["status"] == "nonfinite_loss":
        raise PretrainFailed(
            f"stopped: non-finite loss at epoch {status['epoch']}, step {status['step']} ({status['message']}). "
            f"The last good checkpoint is kept: {checkpoint or 'none was written yet'}. "
            "Lower optim.lr, enable optim.clip_grad_norm, or check the data.",
            out,
        )
    return out
