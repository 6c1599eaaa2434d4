"""MoCo pretraining as a Ray Train job: `run_pretrain` (driver) and `train_loop_per_worker` (workers).

Driver: validated config -> MLflow run -> TorchTrainer(ScalingConfig, RunConfig) -> fit -> export.
Worker: data shard -> MoCo (DDP for the query encoder) -> epochs of `core.moco.train_step` ->
per-epoch kNN monitor, report metrics (+ checkpoint) to Ray, rank 0 logs to MLflow.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from .. import __version__
from ..checkpoints import export_backbone, load_training_checkpoint, save_training_checkpoint, set_rng_state
from ..config import PretrainConfig, flatten
from ..core.augment import BatchAugment, moco_spec, two_view_transform
from ..core.backbones import build_backbone
from ..core.knn import knn_top1
from ..core.moco import Encoder, MoCo, NonFiniteLossError, train_step, unwrap
from ..core.shuffle_bn import resolve_bn_mode
from ..data import build_pretrain_data, check_paths
from ..data.base import Resized, SkipCorrupt, TensorImages, Transformed, collate_batch
from ..tracking import (
    CHECKPOINT_TAG,
    JOB_TAG,
    STATUS_TAG,
    MetricLogger,
    end_run,
    resolve_tracking_uri,
    start_run,
)
from .common import (
    absolute_storage,
    checkpoint_url,
    console,
    ddp_kwargs,
    extract_features,
    fs_exists,
    init_ray,
    lr_at,
    make_torch_trainer,
    prepare_run_dir,
    quiet_ray_worker_logs,
    read_status,
    write_status,
)

log = logging.getLogger(__name__)


def build_moco(cfg: PretrainConfig, bn_mode: str) -> MoCo:
    backbone, feat_dim = build_backbone(cfg.model.arch, cfg.model.cifar_stem)
    encoder = Encoder(backbone, feat_dim, cfg.moco.dim, cfg.moco.use_mlp)
    model = MoCo(encoder, cfg.moco.queue_size, cfg.moco.momentum, cfg.moco.temperature, bn_mode, cfg.moco.num_splits)
    if bn_mode == "sync":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _train_loader(cfg: PretrainConfig, dataset, rank: int, world: int) -> tuple[DataLoader, DistributedSampler]:
    """Batches of uint8 images (device augmentation) or of two augmented views (loader augmentation)."""
    if cfg.data.augment == "loader":
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
        collate_fn=collate_batch,
        pin_memory=cfg.run.use_gpu,
        persistent_workers=cfg.data.loader_workers > 0,
    )
    return loader, sampler


def _maybe_crash(cfg: PretrainConfig, epoch: int, rank: int) -> None:
    d = cfg.debug
    if d.crash_at_epoch != epoch or d.crash_rank != rank:
        return
    if d.crash_marker and Path(d.crash_marker).exists():
        return
    time.sleep(d.crash_delay_s)
    if d.crash_marker:
        Path(d.crash_marker).write_text(f"crashed rank {rank} in epoch {epoch}\n")
    console(f"debug: killing worker rank {rank} during epoch {epoch}")
    os._exit(1)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = PretrainConfig.model_validate(loop_config["cfg"])
    quiet_ray_worker_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.run.use_gpu else torch.device("cpu")
    torch.set_num_threads(cfg.run.torch_threads or max(1, int(cfg.run.cpus_per_worker)))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    data = build_pretrain_data(cfg.data)
    if cfg.moco.queue_size >= len(data.train) and rank == 0:
        console(f"warning: moco.queue_size={cfg.moco.queue_size} >= {len(data.train)} training images: "
              "each image's own previous key will sit among its negatives; learning may stall")
    bn_mode = resolve_bn_mode(cfg.moco.bn_mode, world, device.type)

    torch.manual_seed(cfg.run.seed)  # identical initial model and queue on every rank
    model = build_moco(cfg, bn_mode).to(device)
    channels_last = cfg.run.channels_last
    if channels_last and bn_mode == "split":
        # SplitBatchNorm reshapes to (N/G, C*G, H, W), which drops NHWC: measured on an H100
        # (ResNet-50, bf16, 224 px) 1008 pairs/s with channels_last against 1661 without.
        channels_last = False
        if rank == 0:
            console("run.channels_last ignored: bn_mode resolved to 'split', which runs faster in NCHW")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr = cfg.optim.effective_lr
    optimizer = torch.optim.SGD(unwrap(model).encoder_q.parameters(), lr=lr, momentum=cfg.optim.sgd_momentum,
                                weight_decay=cfg.optim.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.run.amp == "fp16" and device.type == "cuda")
    autocast_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.run.amp]
    torch.manual_seed(cfg.run.seed * 1000 + 1 + rank)  # augmentation randomness differs per rank

    start_epoch, global_step = 0, 0
    knn_init: float | None = None
    knn_last: float | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(loop_config["resume_from"])
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_training_checkpoint(ckpt_dir, rank)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        ts = state["train_state"]
        start_epoch, global_step = int(ts["epoch"]), int(ts["global_step"])
        knn_init, knn_last = ts.get("knn_top1_init"), ts.get("knn_top1_last")
        if state["rng"] is not None:
            set_rng_state(state["rng"])
        if rank == 0:
            console(f"resumed from checkpoint after epoch {start_epoch} (step {global_step})")

    if world > 1:
        model = ray.train.torch.prepare_model(
            model, move_to_device=False, parallel_strategy_kwargs=ddp_kwargs()
        )
    loader, sampler = _train_loader(cfg, data.train, rank, world)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"optim.batch_size={cfg.optim.batch_size} is larger than the {len(data.train)} training images")
    augment = None
    if cfg.data.augment == "device":
        augment = BatchAugment(moco_spec(cfg.moco.version, cfg.data.image_size, cfg.data.blur,
                                         (cfg.data.crop_min_scale, 1.0)))

    logger = MetricLogger(loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id")) if rank == 0 else None
    status_url = loop_config["status_url"]

    def knn_eval() -> float:
        backbone = unwrap(model).encoder_q.backbone
        bank = data.knn_bank
        if cfg.knn.max_bank and len(bank) > cfg.knn.max_bank and isinstance(bank, TensorImages):
            bank = bank.subset(torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))[: cfg.knn.max_bank])
        kw = dict(device=device, image_size=cfg.data.image_size, channels_last=channels_last,
                  loader_workers=cfg.data.loader_workers)
        bank_f, bank_y = extract_features(backbone, bank, **kw)
        val_f, val_y = extract_features(backbone, data.knn_val, **kw)
        return knn_top1(bank_f, bank_y, val_f, val_y, cfg.knn.k, cfg.knn.temperature)

    if knn_init is None:
        knn_init = knn_eval()  # the same encoder at random init, same protocol: every run's own baseline
        knn_last = knn_init
        if logger:
            logger.metrics({"knn_top1": knn_init, "knn_top1_init": knn_init}, step=0)
            logger.tags({"mocoray.bn_mode_effective": bn_mode, "mocoray.world_size": world})
            console(f"{cfg.model.arch}, bn_mode {bn_mode} ({cfg.moco.bn_mode} requested), {world} worker(s), "
                  f"{len(data.train)} images, {steps_per_epoch} steps/epoch; kNN top-1 at init {knn_init:.4f}")

    for epoch in range(start_epoch, cfg.optim.epochs):
        sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        loss_sum = acc_sum = 0.0
        skipped = 0
        try:
            for i, (x, _labels, n_skipped) in enumerate(loader):
                if i == 1:
                    _maybe_crash(cfg, epoch, rank)
                skipped += int(n_skipped)
                cur_lr = lr_at(epoch + i / steps_per_epoch, lr, cfg.optim.epochs, cfg.optim.schedule,
                               cfg.optim.warmup_epochs, cfg.optim.milestones, cfg.optim.gamma)
                for group in optimizer.param_groups:
                    group["lr"] = cur_lr
                if augment is not None:
                    im_q, im_k = augment.two_views(x.to(device, non_blocking=True))
                else:
                    im_q, im_k = x[0].to(device, non_blocking=True), x[1].to(device, non_blocking=True)
                if channels_last:
                    im_q = im_q.contiguous(memory_format=torch.channels_last)
                    im_k = im_k.contiguous(memory_format=torch.channels_last)
                if cfg.debug.nan_at_step == global_step and rank == 0:
                    im_q = im_q * float("nan")
                res = train_step(model, im_q, im_k, optimizer, scaler, autocast_dtype, cfg.optim.clip_grad_norm)
                loss_sum += res.loss
                acc_sum += res.accuracy
                global_step += 1
        except NonFiniteLossError as err:
            # Every rank raises at the same step (the check is all-reduced). No checkpoint is written
            # from here on: the last good one stays the run's latest.
            if rank == 0:
                write_status(status_url, {"status": "nonfinite_loss", "epoch": epoch + 1, "step": global_step,
                                           "message": str(err)})
                if logger:
                    logger.tags({STATUS_TAG: "nonfinite_loss"})
                console(f"stopping: {err} at epoch {epoch + 1}, step {global_step}")
            return
        train_time = time.perf_counter() - t0
        epoch_no = epoch + 1
        last = epoch_no == cfg.optim.epochs
        if epoch_no % cfg.knn.every == 0 or last:
            knn_last = knn_eval()
        metrics = {
            "epoch": epoch_no,
            "loss": loss_sum / steps_per_epoch,
            "contrastive_acc": acc_sum / steps_per_epoch,
            "knn_top1": knn_last,
            "knn_top1_init": knn_init,
            "knn_margin": knn_last - knn_init,
            "lr": cur_lr,
            "pairs_per_s": steps_per_epoch * cfg.optim.batch_size / train_time,
            "epoch_time_s": time.perf_counter() - t0,
            "corrupt_images_skipped": skipped,
        }
        if world > 1:  # every rank joins the all-reduce, skipped images or not
            t = torch.tensor([skipped], device=device)
            torch.distributed.all_reduce(t)
            metrics["corrupt_images_skipped"] = int(t.item())
        if logger:
            logger.metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch_no)
            console(f"epoch {epoch_no}/{cfg.optim.epochs}  loss {metrics['loss']:.4f}  "
                  f"acc {metrics['contrastive_acc']:.3f}  kNN {knn_last:.4f} ({knn_last - knn_init:+.4f} vs init)  "
                  f"lr {cur_lr:.4g}  {metrics['pairs_per_s']:.0f} pairs/s  {metrics['epoch_time_s']:.1f}s")
        if epoch_no % cfg.run.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as tmp:
                inner = unwrap(model)
                save_training_checkpoint(
                    tmp,
                    rank=rank,
                    model_state=inner.state_dict() if rank == 0 else None,
                    optimizer_state=optimizer.state_dict() if rank == 0 else None,
                    scaler_state=scaler.state_dict() if rank == 0 else None,
                    train_state={"epoch": epoch_no, "global_step": global_step, "knn_top1_init": knn_init,
                                 "knn_top1_last": knn_last},
                    meta={"config": cfg.model_dump(mode="json"), "metrics": metrics, "bn_mode_effective": bn_mode,
                          "world_size": world, "mocoray": __version__, "torch": torch.__version__},
                )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"epoch_{epoch_no:04d}")
        else:
            ray.train.report(metrics)
    if rank == 0:
        write_status(status_url, {"status": "completed", "epoch": cfg.optim.epochs, "step": global_step})


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
    for section, field in (("data", "root"), ("data", "val_root"), ("run", "storage_path"), ("debug", "crash_marker")):
        obj = getattr(cfg, section)
        value = getattr(obj, field)
        if value and "://" not in value:
            setattr(obj, field, str(Path(value).expanduser().resolve()))
    return cfg


def run_pretrain(
    cfg: PretrainConfig,
    address: str | None = None,
    resume: bool | str = False,
    resume_from: str | None = None,
    extra_tags: dict[str, str] | None = None,
    callbacks: list | None = None,
) -> PretrainResult:
    """Run (or, with `resume`, continue) one pretraining job; returns where its results are.

    resume: False = the run must be new; True = it must exist; "auto" = continue it if it exists
    (what a restarted Tune trial wants). `extra_tags` go on the MLflow run (sweeps add their parent
    link); `callbacks` go to the trainer's RunConfig (sweeps add Tune's report forwarding).
    """
    cfg = with_absolute_paths(cfg)
    check_paths(cfg.data)
    storage = absolute_storage(cfg.run.storage_path)
    run_dir = storage.rstrip("/") + "/" + cfg.run.name
    if resume == "auto":
        resume = fs_exists(run_dir)
    try:
        status_url = prepare_run_dir(run_dir, cfg.run.name, bool(resume))
    except (FileExistsError, FileNotFoundError) as err:
        raise PretrainFailed(str(err)) from None

    tracking_uri = run_id = None
    if cfg.tracking.enabled:
        tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
        tags = {JOB_TAG: "pretrain", "mocoray.run_dir": run_dir, **(extra_tags or {})}
        try:
            run_id = start_run(tracking_uri, cfg.tracking.experiment, cfg.run.name,
                               flatten(cfg.model_dump(mode="json")), tags, run_key=run_dir)
        except Exception as err:  # an unreachable tracking server must not stop training
            log.warning("MLflow unavailable at %s (%s); training without tracking", tracking_uri, err)
            print(f"[mocoray] warning: MLflow unavailable at {tracking_uri}: {str(err).splitlines()[0][:200]}")
            tracking_uri = run_id = None

    init_ray(address)
    trainer = make_torch_trainer(
        train_loop_per_worker,
        {"cfg": cfg.model_dump(mode="json"), "tracking_uri": tracking_uri, "mlflow_run_id": run_id,
         "status_url": status_url, "resume_from": resume_from},
        cfg.run, storage, callbacks,
    )
    try:
        result = trainer.fit()
    except Exception as err:
        if run_id:
            _safe_end(tracking_uri, run_id, "FAILED", {STATUS_TAG: "failed"})
        raise PretrainFailed(f"pretraining run {cfg.run.name!r} failed: {err}") from err

    status = read_status(status_url) or {"status": "unknown"}
    checkpoint = checkpoint_url(result, storage)
    backbone_path = None
    if checkpoint and status["status"] == "completed":
        backbone_path = run_dir + "/backbone.pt"
        export_backbone(checkpoint, backbone_path)
    if run_id:
        final_tags = {STATUS_TAG: status["status"]}
        if checkpoint:
            final_tags[CHECKPOINT_TAG] = checkpoint
        if backbone_path:
            final_tags["mocoray.backbone"] = backbone_path
        _safe_end(tracking_uri, run_id, "FINISHED" if status["status"] == "completed" else "FAILED", final_tags)
    out = PretrainResult(run_dir=run_dir, checkpoint=checkpoint, metrics=dict(result.metrics or {}),
                         status=status["status"], mlflow_run_id=run_id, tracking_uri=tracking_uri,
                         backbone_path=backbone_path)
    if status["status"] == "nonfinite_loss":
        raise PretrainFailed(
            f"stopped: non-finite loss at epoch {status['epoch']}, step {status['step']} ({status['message']}). "
            f"The last good checkpoint is kept: {checkpoint or 'none was written yet'}. "
            "Lower optim.lr, enable optim.clip_grad_norm, or check the data.",
            out,
        )
    return out


def _safe_end(uri: str | None, run_id: str, status: str, tags: dict[str, str]) -> None:
    try:
        end_run(uri, run_id, status, tags)  # type: ignore[arg-type]
    except Exception as err:
        log.warning("could not close MLflow run %s: %s", run_id, err)
