"""The linear-evaluation worker: `train_one_epoch`, `evaluate` and `train_loop_per_worker` (what Ray Train
runs on every worker), with the logistic-regression protocol and the head's checkpoints.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from ... import __version__
from ...checkpoints import load_training_checkpoint, save_training_checkpoint
from ...config import LinearConfig
from ...core.distributed import all_reduce_sum, rank_world
from ...core.logreg import fit_logreg
from ...core.schedule import lr_at
from ...data import labelled_splits, take
from ...data.ray_ingest import ShardLoader
from ...encoders import EncoderSource
from ...tracking.artifacts import log_environment
from ...tracking.client import (
    STATUS_TAG,
    MetricLogger,
)
from .. import runtime
from ..calibration import recompute_bn_on_images
from ..faults import Faults
from .features import (
    BackboneChangedError,
    CachedFeatures,
    LinearHead,
    StreamedFeatures,
    assert_backbone_unchanged,
    backbone_snapshot,
    build_frozen_backbone,
    center_views,
    labelled_view_item,
)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(top-1, top-5) correct counts; top-5 is top-C when there are fewer than 5 classes."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == labels.view(-1, 1)
    return int(hit[:, 0].sum()), int(hit.any(dim=1).sum())


def train_one_epoch(classifier: nn.Module, optimizer: torch.optim.Optimizer, batches, cfg: LinearConfig,
                    epoch: int, steps_per_epoch: int, device: torch.device) -> dict[str, float]:
    classifier.train()
    t0 = time.perf_counter()
    loss_sum = correct = seen = 0.0
    cur_lr = cfg.optim.lr
    for i, (feats, y) in enumerate(batches):
        cur_lr = lr_at(epoch + i / steps_per_epoch, cfg.optim.lr, cfg.optim.epochs, cfg.optim.schedule, 0,
                       cfg.optim.milestones, cfg.optim.gamma)
        for group in optimizer.param_groups:
            group["lr"] = cur_lr
        logits = classifier(feats)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(dim=1) == y).sum().item()
        seen += len(y)
    train_time = time.perf_counter() - t0
    loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], device)
    return {"loss": loss_sum / seen, "train_top1": correct / seen, "lr": cur_lr, "images_per_s": seen / train_time}


@torch.no_grad()
def evaluate(classifier: nn.Module, batches, device: torch.device, sharded: bool) -> tuple[float, float]:
    """(top-1, top-5) on the validation batches; `sharded`: each rank saw its share, so counts are summed."""
    classifier.eval()
    counts = [0.0, 0.0, 0.0]
    for feats, y in batches:
        c1, c5 = topk_correct(classifier(feats), y)
        counts = [counts[0] + c1, counts[1] + c5, counts[2] + len(y)]
    c1, c5, n = all_reduce_sum(counts, device) if sharded else counts
    return c1 / n, c5 / n


def report_with_checkpoint(head: nn.Module, optimizer: torch.optim.Optimizer | None, metrics: dict,
                           cfg: LinearConfig, loop_config: dict, rank: int, world: int) -> None:
    """Report `metrics` to Ray with a checkpoint of the linear head (rank 0 writes it)."""
    import ray.train

    epoch_no = metrics["epoch"]
    with tempfile.TemporaryDirectory() as tmp:
        save_training_checkpoint(
            tmp,
            rank=rank,
            model_state=head.state_dict() if rank == 0 else None,
            optimizer_state=optimizer.state_dict() if rank == 0 and optimizer is not None else None,
            scaler_state=None,
            train_state={"epoch": epoch_no, "linear_top1": metrics["linear_top1"],
                         "linear_top5": metrics["linear_top5"]},
            meta={"config": cfg.model_dump(mode="json"), "encoder": loop_config["encoder"], "metrics": metrics,
                  "world_size": world, "mocoray": __version__, "torch": torch.__version__},
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"epoch_{epoch_no:04d}")


def logreg_protocol(source: CachedFeatures, head: LinearHead, cfg: LinearConfig, loop_config: dict,
                    logger: MetricLogger | None, rank: int, world: int, device: torch.device) -> None:
    """`linear.mode=logreg`: one scikit-learn fit on rank 0, stored as the fc layer; no epochs."""
    t0 = time.perf_counter()
    top = [0.0, 0.0]
    fc = head.fc
    if rank == 0:
        res = fit_logreg(source.train_f, source.train_y, source.val_f, source.val_y, cfg.run.seed)
        fc.weight.data.copy_(res.weight[: fc.out_features])
        fc.bias.data.copy_(res.bias[: fc.out_features])
        top = [res.top1, res.top5]
    top1, top5 = all_reduce_sum(top, device)  # the other ranks only need the numbers for their report
    metrics = {"epoch": 1, "linear_top1": top1, "linear_top5": top5, "epoch_time_s": time.perf_counter() - t0}
    if logger:
        logger.metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=1)
        runtime.console(f"logistic regression on standardised features: val top-1 {top1:.4f}  top-5 {top5:.4f}  "
                        f"({metrics['epoch_time_s']:.1f}s)")
    report_with_checkpoint(head, None, metrics, cfg, loop_config, rank, world)
    if rank == 0:
        runtime.write_status(loop_config["status_url"], {"status": "completed", "epoch": 1,
                                                          "linear_top1": top1, "linear_top5": top5})


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = LinearConfig.model_validate(loop_config["cfg"])
    encoder = EncoderSource(**loop_config["encoder"])
    faults = Faults(**loop_config["faults"])
    unfrozen = faults.unfreeze_backbone
    rank, world = rank_world()
    runtime.start_worker_console(loop_config, rank)
    device = runtime.worker_device(cfg.run)

    train_raw, val_raw, num_classes = labelled_splits(cfg.data)
    train_raw = take(train_raw, cfg.data.max_images)
    size, mode = cfg.data.image_size, cfg.linear.mode
    train_center = center_views(train_raw, size, cfg.linear.val_resize) if mode != "augmented" else None
    val_center = center_views(val_raw, size, cfg.linear.val_resize)

    backbone, feat_dim = build_frozen_backbone(encoder, cfg.run.seed, cfg.encoder.vit_pool)
    backbone.to(device)
    if cfg.run.channels_last:
        backbone.to(memory_format=torch.channels_last)
    if encoder.source is None:  # a random-init baseline, made fair (see recompute_bn_on_images)
        images = train_center if train_center is not None else center_views(train_raw, size, cfg.linear.val_resize)
        recompute_bn_on_images(backbone, images, size, device, cfg.run.channels_last, cfg.data.loader_workers)
    reference = backbone_snapshot(backbone)
    if unfrozen:
        backbone.requires_grad_(True)
        backbone.train()

    torch.manual_seed(cfg.run.seed)  # the same fc on every rank and in every protocol
    head = LinearHead(feat_dim, num_classes, cfg.linear.feature_norm).to(device)
    params = list(head.parameters()) + (list(backbone.parameters()) if unfrozen else [])
    optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.sgd_momentum,
                                weight_decay=cfg.optim.weight_decay)

    start_epoch, top1, top5 = 0, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            saved = load_training_checkpoint(ckpt_dir, rank)
        head.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        progress = saved["train_state"]
        start_epoch, top1, top5 = int(progress["epoch"]), progress.get("linear_top1"), progress.get("linear_top5")
        if rank == 0:
            runtime.console(f"resumed the linear evaluation after epoch {start_epoch}")
    classifier = ray.train.torch.prepare_model(head, move_to_device=False) if world > 1 else head

    t0 = time.perf_counter()
    per_worker = cfg.optim.batch_size // world
    shard = None
    if mode in ("cached", "logreg"):
        source: CachedFeatures | StreamedFeatures = CachedFeatures(backbone, train_center, val_center, cfg, device)
        sampler = DistributedSampler(range(source.num_train), num_replicas=world, rank=rank, shuffle=True,
                                     seed=cfg.run.seed)
    elif cfg.data.loader == "ray":  # augmented views made by the ingest tasks, this rank's DistributedSampler order
        shard = ShardLoader(ray.train.get_dataset_shard("train"), loop_config["ingest_clock"], per_worker,
                            len(train_raw) // cfg.optim.batch_size, cfg.data.ingest.prefetch_batches,
                            labelled_view_item)
        source = StreamedFeatures(backbone, train_raw, train_center, val_center, cfg, device, None, unfrozen, shard)
    else:
        sampler = DistributedSampler(range(len(train_raw)), num_replicas=world, rank=rank, shuffle=True,
                                     seed=cfg.run.seed)
        source = StreamedFeatures(backbone, train_raw, train_center, val_center, cfg, device, sampler, unfrozen)
    extract_s = time.perf_counter() - t0
    # the ray path trains whole global batches only; the torch path's last step may be short
    steps_per_epoch = shard.steps_per_epoch if shard is not None else -(-sampler.num_samples // per_worker)
    sharded_val = isinstance(source, StreamedFeatures)

    logger = MetricLogger(loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id")) if rank == 0 else None
    if rank == 0:
        log_environment(loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id"), world, device)
    if mode == "logreg":
        logreg_protocol(source, head, cfg, loop_config, logger, rank, world, device)  # type: ignore[arg-type]
        return
    if rank == 0:
        runtime.console(f"linear eval ({mode}) of {encoder.label}: {encoder.arch}, {feat_dim}-d features, {num_classes} classes, "
                f"{source.num_train} train / {len(val_center)} val images, {world} worker(s), "
                f"{steps_per_epoch} steps/epoch" + (f"; features cached in {extract_s:.1f}s" if mode in ("cached", "logreg") else ""))

    for epoch in range(start_epoch, cfg.optim.epochs):
        t0 = time.perf_counter()
        if shard is not None:
            shard.set_epoch(epoch)  # the next pass serves this epoch (its first step: resumes are at epoch ends)
            record = (lambda step, keys, e=epoch: faults.record_batch(e, step, rank, keys)) if faults.batches_dir else None
            batches = source.train_batches(shard, per_worker, record)  # type: ignore[call-arg]
        else:
            sampler.set_epoch(epoch)
            batches = source.train_batches(sampler, per_worker)
        train = train_one_epoch(classifier, optimizer, batches, cfg, epoch, steps_per_epoch, device)
        epoch_no = epoch + 1
        last = epoch_no == cfg.optim.epochs
        evaluated = epoch_no % cfg.linear.eval_every == 0 or last
        if evaluated:
            top1, top5 = evaluate(classifier, source.val_batches(), device, sharded_val)
        try:
            assert_backbone_unchanged(backbone, reference)
        except BackboneChangedError as err:
            if rank == 0:
                runtime.write_status(loop_config["status_url"], {"status": "backbone_changed", "epoch": epoch_no,
                                                          "message": str(err)})
                if logger:
                    logger.tags({STATUS_TAG: "backbone_changed"})
            raise
        metrics = {"epoch": epoch_no, **train, "linear_top1": top1, "linear_top5": top5,
                   "epoch_time_s": time.perf_counter() - t0}
        if logger:
            logger.metrics({k: v for k, v in metrics.items()
                            if k != "epoch" and (evaluated or not k.startswith("linear_"))}, step=epoch_no)
            val = f"val top-1 {top1:.4f}  top-5 {top5:.4f}" if top1 is not None else "val not yet evaluated"
            runtime.console(f"epoch {epoch_no}/{cfg.optim.epochs}  loss {train['loss']:.4f}  train top-1 "
                    f"{train['train_top1']:.4f}  {val}  lr {train['lr']:.4g}  {metrics['epoch_time_s']:.1f}s")
        # Ray gets a report (a barrier, ~1-2 s in Train V2) only with a checkpoint: a cached-feature epoch
        # takes milliseconds, and MLflow already has every epoch's metrics.
        if epoch_no % cfg.run.checkpoint_every == 0 or last:
            report_with_checkpoint(head, optimizer, metrics, cfg, loop_config, rank, world)
    if rank == 0:
        runtime.write_status(loop_config["status_url"], {"status": "completed", "epoch": cfg.optim.epochs,
                                                          "linear_top1": top1, "linear_top5": top5})
