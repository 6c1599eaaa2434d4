"""The pretraining worker: `train_loop_per_worker` (what Ray Train runs on every worker) and
`train_one_epoch` (the epoch's MoCo steps), readable top to bottom.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ...config import PretrainConfig
from ...core.amp import AMP_DTYPES
from ...core.backbones import build_backbone
from ...core.bn_stats import average_bn_statistics
from ...core.compiled import compile_encoders, make_sgd
from ...core.distributed import all_reduce_sum
from ...core.lars import LARS
from ...core.moco import Encoder, MoCo, NonFiniteLossError, train_step, unwrap
from ...core.moco_v3 import MoCoV3, build_moco_v3, global_backbone_bn, weight_decay_groups
from ...core.schedule import lr_at, momentum_at
from ...core.shuffle_bn import resolve_bn_mode
from ...core.vit import VIT_CONFIGS, freeze_patch_embed
from ...data import build_pretrain_data
from ...tracking.artifacts import log_environment
from ...tracking.client import (
    STATUS_TAG,
    MetricLogger,
    last_logged_step,
    safely,
)
from .. import runtime
from ..faults import Faults
from ..gpu_metrics import gpu_monitor
from ..preemption import StepCheckpoints
from ..progress import StepProgress
from .monitor import evaluate_trained, knn_at_init
from .state import (
    TrainState,
    check_same_queue,
    log_epoch,
    mid_epoch_metrics,
    restore,
    save_checkpoint,
    start_attempt,
    starting_checkpoint,
)
from .views import TwoViews, ray_train_loader, train_loader, two_views


def build_moco(cfg: PretrainConfig, bn_mode: str) -> MoCo | MoCoV3:
    backbone, feat_dim = build_backbone(cfg.model.arch, cfg.model.cifar_stem)
    if cfg.model.freeze_patch_embed:
        freeze_patch_embed(backbone)
    if cfg.moco.version == "v3":  # its heads synchronise their own BN, the backbone's too unless backbone_bn local
        if cfg.moco.backbone_bn == "global":
            global_backbone_bn(backbone)
        layers = cfg.moco.proj_layers or (3 if cfg.model.arch in VIT_CONFIGS else 2)
        return build_moco_v3(backbone, feat_dim, cfg.moco.dim, cfg.moco.hidden_dim, layers, cfg.moco.momentum,
                             cfg.moco.temperature)
    encoder = Encoder(backbone, feat_dim, cfg.moco.dim, cfg.moco.use_mlp, cfg.moco.head_bn)
    model = MoCo(encoder, cfg.moco.queue_size, cfg.moco.momentum, cfg.moco.temperature, bn_mode, cfg.moco.num_splits)
    if bn_mode == "sync":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def make_optimizer(model: MoCo | MoCoV3, cfg: PretrainConfig, device_type: str) -> torch.optim.Optimizer:
    """v1/v2: SGD on encoder_q, weight decay on every parameter (the papers'). v3: encoder_q and the
    predictor, no weight decay on biases and norm parameters; SGD, AdamW (ViT) or LARS (ResNet)."""
    lr, wd = cfg.optim.effective_lr, cfg.optim.weight_decay
    if cfg.moco.version != "v3":
        return make_sgd(model.encoder_q.parameters(), lr, cfg.optim.sgd_momentum, wd, device_type)
    groups = weight_decay_groups(model, wd)
    if cfg.optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=device_type == "cuda" or None)
    if cfg.optim.optimizer == "lars":  # its own rule: weight decay and trust ratio on matrices only
        return LARS([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=wd, momentum=cfg.optim.sgd_momentum)
    return make_sgd(groups, lr, cfg.optim.sgd_momentum, wd, device_type)


@dataclass
class EpochStats:
    loss: float
    contrastive_acc: float
    lr: float
    momentum: float
    steps: int  # trained in this call (fewer than the epoch's when it resumed mid-epoch)
    train_time_s: float
    corrupt_images_skipped: int = 0


def train_one_epoch(model, loader, optimizer, scaler, views: TwoViews, cfg: PretrainConfig,
                    epoch: int, state: TrainState, device: torch.device, channels_last: bool, rank: int,
                    faults: Faults, progress: StepProgress | None = None,
                    step_checkpoints: StepCheckpoints | None = None) -> EpochStats:
    """The epoch's MoCo steps from `state.step_in_epoch` on; raises NonFiniteLossError on every rank at once
    if the loss blows up. `step_checkpoints` may save a mid-epoch checkpoint after any step.

    Ends with one set of BN running statistics on every rank (see `average_bn_statistics`): each rank's
    followed its own shard, and what comes next (kNN, checkpoint, export) must see the same encoder everywhere.
    Once per epoch is enough, as nothing reads the running statistics during training (both encoders run in
    training mode), and it costs one small all-reduce instead of DDP's buffer broadcast at every step (which
    would also re-send the K x dim queue).
    """
    model.train()
    steps = loader.sampler.steps_per_epoch
    start = state.step_in_epoch
    lr = cfg.optim.effective_lr
    amp_dtype = AMP_DTYPES[cfg.run.amp]
    t0 = time.perf_counter()
    skipped = 0
    cur_lr, moco = lr, unwrap(model)
    for i, (x, keys, n_skipped) in enumerate(loader, start=start):  # keys: labels (torch), sample ids (ray)
        if i == start + 1:
            faults.maybe_crash(epoch, rank)
        cur_lr = lr_at(epoch + i / steps, lr, cfg.optim.epochs, cfg.optim.schedule, cfg.optim.warmup_epochs,
                       cfg.optim.milestones, cfg.optim.gamma)
        for group in optimizer.param_groups:
            group["lr"] = cur_lr
        moco.momentum = momentum_at((epoch + i / steps) / cfg.optim.epochs, cfg.moco.momentum,
                                    cfg.moco.momentum_schedule)
        faults.record_batch(epoch, i, rank, keys)
        im_q, im_k, replaced = views(x, device)
        skipped += int(n_skipped) + replaced
        if channels_last:
            im_q = im_q.contiguous(memory_format=torch.channels_last)
            im_k = im_k.contiguous(memory_format=torch.channels_last)
        im_q = faults.poison(im_q, state.global_step, rank)
        res = train_step(model, im_q, im_k, optimizer, scaler, amp_dtype, cfg.optim.clip_grad_norm)
        state.epoch_loss_sum += res.loss
        state.epoch_acc_sum += res.accuracy
        state.global_step += 1
        if progress is not None:
            progress.step(i, res.loss, cur_lr, state.global_step)
        state.step_in_epoch = i + 1
        faults.slow_down()
        if step_checkpoints:
            step_checkpoints.after_step(state)
    (skipped,) = all_reduce_sum([skipped], device)  # every rank joins, skipped images or not
    average_bn_statistics(unwrap(model))
    stats = EpochStats(loss=state.epoch_loss_sum / steps, contrastive_acc=state.epoch_acc_sum / steps, lr=cur_lr,
                       momentum=moco.momentum, steps=steps - start, train_time_s=time.perf_counter() - t0,
                       corrupt_images_skipped=int(skipped))
    state.step_in_epoch, state.epoch_loss_sum, state.epoch_acc_sum = 0, 0.0, 0.0
    return stats


def epoch_metrics(state: TrainState, stats: EpochStats, cfg: PretrainConfig, epoch_time_s: float) -> dict:
    return {
        "epoch": state.epoch,
        "loss": stats.loss,
        "contrastive_acc": stats.contrastive_acc,
        "knn_top1": state.knn_top1_last,
        "knn_top1_init": state.knn_top1_init,
        "knn_margin": state.knn_top1_last - state.knn_top1_init,
        **({"logreg_top1": state.logreg_top1_last, "logreg_top1_init": state.logreg_top1_init,
            "logreg_margin": state.logreg_top1_last - state.logreg_top1_init}
           if state.logreg_top1_last is not None else {}),
        "lr": stats.lr,
        "momentum": stats.momentum,
        "pairs_per_s": stats.steps * cfg.optim.batch_size / stats.train_time_s,
        "epoch_time_s": epoch_time_s,  # training and kNN
        "corrupt_images_skipped": stats.corrupt_images_skipped,
        "preemptions": state.preemptions,
        "steps_lost": state.steps_lost,
    }


def epoch_line(m: dict, cfg: PretrainConfig, monitored: bool = True) -> str:
    monitor = ""
    if monitored:
        monitor = f"kNN {m['knn_top1']:.4f} ({m['knn_margin']:+.4f} vs init)  " + (
            f"logreg {m['logreg_top1']:.4f} ({m['logreg_margin']:+.4f})  " if "logreg_top1" in m else "")
    return (f"epoch {m['epoch']}/{cfg.optim.epochs}  loss {m['loss']:.4f}  acc {m['contrastive_acc']:.3f}  "
            + monitor + f"lr {m['lr']:.4g}  "
            f"{m['pairs_per_s']:.0f} pairs/s  {m['epoch_time_s']:.1f}s")


def epochs_logged(logger: MetricLogger | None) -> int:
    """The last epoch the MLflow run already has metrics for (0: none), so that no epoch is logged twice.

    Read before each epoch is logged, as an epoch can be trained again: after a resume from a checkpoint
    older than the last logged epoch, after a worker-group restart, and the workers of an interrupted attempt
    can outlive their driver by a few seconds (Ray ends them asynchronously) and log one more epoch.
    """
    if logger is None or logger.run_id is None:
        return 0
    return safely("read of the logged epochs", last_logged_step, logger.uri, logger.run_id, "loss") or 0


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


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = PretrainConfig.model_validate(loop_config["cfg"])
    faults = Faults(**loop_config["faults"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    runtime.start_worker_console(loop_config, rank)
    device = runtime.worker_device(cfg.run)

    data = build_pretrain_data(cfg.data)
    if cfg.moco.version != "v3" and cfg.moco.queue_size >= len(data.train) and rank == 0:
        runtime.console(f"warning: moco.queue_size={cfg.moco.queue_size} >= {len(data.train)} training images: "
                "each image's own previous key will sit among its negatives; learning may stall")
    # v3 shuffles no keys (its heads' BN is over the global batch); v1/v2 resolve their BN-leak handling per world
    bn_mode = "none" if cfg.moco.version == "v3" else resolve_bn_mode(cfg.moco.bn_mode, world, device.type)
    torch.manual_seed(cfg.run.seed)  # identical initial model and queue on every rank
    model = build_moco(cfg, bn_mode).to(device)
    channels_last = cfg.run.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.run.compile:
        compile_encoders(model)
    optimizer = make_optimizer(model, cfg, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.run.amp == "fp16" and device.type == "cuda")
    torch.manual_seed(cfg.run.seed * 1000 + 1 + rank)  # augmentation randomness differs per rank

    start = starting_checkpoint(loop_config, rank, world)
    state = TrainState()
    if start.checkpoint is not None:
        state = restore(start.checkpoint, model, optimizer, scaler, rank)
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=runtime.ddp_kwargs())
        if cfg.moco.version != "v3":
            check_same_queue(model)
    if cfg.data.loader == "ray":
        loader = sampler = ray_train_loader(cfg, len(data.train), world, loop_config["ingest_clock"])
    else:
        loader, sampler = train_loader(cfg, data.train, rank, world)
    if len(loader) == 0:
        raise ValueError(f"optim.batch_size={cfg.optim.batch_size} is larger than the {len(data.train)} training images")
    views = two_views(cfg)
    logger = None
    if rank == 0:  # every start of the worker group: the world size may differ after a restart
        logger = MetricLogger(loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id"),
                              loop_config["unsent_url"])
        start_attempt(logger, state, start, world, len(loader), loop_config["preemption_record"])
        log_environment(loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id"), world, device)
    progress = StepProgress(cfg.progress, cfg.optim.batch_size, cfg.optim.epochs, rank, logger)
    backbone = unwrap(model).encoder_q.backbone

    if state.knn_top1_init is None:
        state.monitor(*knn_at_init(backbone, data, cfg, device, channels_last), init=True)
        if logger:
            init = {"knn_top1": state.knn_top1_init, "knn_top1_init": state.knn_top1_init,
                    "logreg_top1": state.logreg_top1_init, "logreg_top1_init": state.logreg_top1_init}
            logger.metrics(init, step=0)
            logger.tags({"mocoray.bn_mode_effective": bn_mode, "mocoray.world_size": world})
            bn = (f"MoCo v3 (BN over the global batch: heads{', backbone' if cfg.moco.backbone_bn == 'global' else ''})"
                  if cfg.moco.version == "v3"
                  else f"bn_mode {bn_mode} ({cfg.moco.bn_mode} requested)")
            runtime.console(f"{cfg.model.arch}, {bn}, {world} worker(s), "
                    f"{len(data.train)} images, {len(loader)} steps/epoch; kNN top-1 at init {state.knn_top1_init:.4f}")

    metrics = {"knn_top1": state.knn_top1_last, "knn_top1_init": state.knn_top1_init}  # until an epoch ends
    step_checkpoints = StepCheckpoints(
        cfg.run.preemption_check_steps, cfg.run.checkpoint_every_steps, rank, loop_config["preemption_record"],
        lambda: save_checkpoint(model, optimizer, scaler, state, cfg, mid_epoch_metrics(state, metrics), rank, world,
                                bn_mode))
    with gpu_monitor(device) as monitor:  # GPU utilisation and memory next to pairs/s (nothing on CPUs)
        for epoch in range(state.epoch, cfg.optim.epochs):
            sampler.set_epoch(epoch, state.step_in_epoch)
            t0 = time.perf_counter()
            progress.start_epoch(epoch, len(loader), log_metrics=epoch + 1 > epochs_logged(logger))
            try:
                stats = train_one_epoch(model, loader, optimizer, scaler, views, cfg, epoch, state, device,
                                        channels_last, rank, faults, progress, step_checkpoints)
            except NonFiniteLossError as err:
                report_nonfinite_loss(err, epoch, state, rank, loop_config["status_url"], logger)
                return
            state.epoch = epoch + 1
            last = state.epoch == cfg.optim.epochs
            monitored = state.epoch % cfg.knn.every == 0 or last
            if monitored:
                state.monitor(*evaluate_trained(backbone, data, cfg, device, channels_last))
            metrics = epoch_metrics(state, stats, cfg, time.perf_counter() - t0) | monitor.epoch_averages()
            if state.epoch % cfg.run.checkpoint_every == 0 or last:
                save_checkpoint(model, optimizer, scaler, state, cfg, metrics, rank, world, bn_mode)
                faults.maybe_interrupt_driver(state.epoch, rank)
            else:
                ray.train.report(metrics)
            if logger:  # after the checkpoint: a group stopped in between re-logs it when it resumes
                if state.epoch > epochs_logged(logger):
                    log_epoch(logger, metrics, monitored)
                runtime.console(epoch_line(metrics, cfg, monitored))
            faults.maybe_pause(state.epoch, rank)
    if rank == 0:
        runtime.write_status(loop_config["status_url"], {"status": "completed", "epoch": cfg.optim.epochs,
                                                  "step": state.global_step})
