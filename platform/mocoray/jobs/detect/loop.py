"""The detection-transfer worker: `train_loop_per_worker` (what Ray Train runs on every worker), the
detector built around the encoder, its checkpoint state, and evaluation on the validation split.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ... import __version__
from ...checkpoints import restore_training_checkpoint, save_training_checkpoint
from ...config.detect import DetectConfig, DetectDataConfig
from ...core.amp import AMP_DTYPES
from ...core.distributed import all_reduce_sum, rank_world
from ...core.moco import NonFiniteLossError, unwrap
from ...core.schedule import lr_at
from ...data import SkipCorrupt, take
from ...data.detection import (
    FileDetections,
    RandomHorizontalFlip,
    ScatteredDigitsDet,
    coco_detection,
    collate_detection,
    scattered_digits_det,
    voc_detection,
)
from ...data.detection.voc import ClassList, voc_class_list
from ...detection.engine import evaluate, gather_on_rank0, train_one_epoch
from ...detection.evaluation import coco_metrics, voc07_ap, voc07_metrics
from ...detection.model import build_detector, load_encoder_backbone
from ...encoders import EncoderSource, backbone_state_dict, weights_path
from ...tracking.artifacts import log_environment, log_text
from ...tracking.client import STATUS_TAG, MetricLogger, safely
from .. import runtime
from ..faults import Faults

NORM_TAG = "mocoray.norm_effective"
CLASSES_ARTIFACT = "classes.txt"  # the class of label i on line i


DetectionSet = FileDetections | ScatteredDigitsDet  # each has .classes, .num_classes, .counts


def voc_classes(data: DetectDataConfig) -> ClassList:
    """The classes of a VOC config: data.classes, else the labels.txt of its folders, else VOC's 20."""
    val_field = "data.val_root" if data.val_root else "data.root"
    return voc_class_list(data.classes, [(str(data.root), data.train_sets, "data.root"),
                                         (str(data.val_root or data.root), data.val_sets, val_field)])


def detection_splits(data: DetectDataConfig) -> tuple[DetectionSet, DetectionSet]:
    """(train, val) of `data.name`: training leaves out VOC `difficult` / COCO crowd objects and images left
    without boxes, and flips when `data.use_flip`; validation keeps everything, as the metrics expect.
    (The config has checked that the dataset's paths are set.)"""
    flip = RandomHorizontalFlip() if data.use_flip else None
    if data.name == "scattered-digits-det":
        return scattered_digits_det(data.train_canvases, data.val_canvases, canvas=data.canvas_size,
                                    max_digits=data.max_digits, transform=flip)
    root, val_root = str(data.root), str(data.val_root or data.root)
    if data.name == "voc":
        classes = voc_classes(data).names
        train = voc_detection(root, data.train_sets, keep_difficult=False, skip_empty=True, classes=classes,
                              transform=flip, field="data.root")
        val = voc_detection(val_root, data.val_sets, classes=classes,
                            field="data.val_root" if data.val_root else "data.root")
        return train, val
    train = coco_detection(str(data.annotations), root, keep_crowd=False, skip_empty=True, transform=flip,
                           annotations_field="data.annotations", images_field="data.root")
    val = coco_detection(str(data.val_annotations), val_root, annotations_field="data.val_annotations",
                         images_field="data.val_root")
    if val.classes != train.classes:
        raise ValueError(f"data.val_annotations lists other categories than data.annotations "
                         f"({len(val.classes)} vs {len(train.classes)}: {val.classes[:5]} vs "
                         f"{train.classes[:5]})")
    return train, val


def build_model(cfg: DetectConfig, encoder: EncoderSource, num_classes: int, norm: str | None = None
                ) -> nn.Module:
    """The Faster R-CNN of `cfg.model` for `num_classes` classes, its backbone holding the encoder's weights
    (a random-init backbone is drawn from `run.seed`, so every rank builds the same detector).
    `norm`: default `cfg.model`'s, resolved for `cfg.run`."""
    m = cfg.model
    torch.manual_seed(cfg.run.seed)
    detector = build_detector(
        encoder.arch, num_classes, layout=m.layout, norm=norm or m.effective_norm(cfg.run),
        frozen_stages=m.frozen_stages, cifar_stem=encoder.cifar_stem, min_size=tuple(m.min_size),
        max_size=m.max_size, anchor_sizes=m.anchor_sizes, aspect_ratios=tuple(m.aspect_ratios),
        roi_size=m.roi_size, fpn_channels=m.fpn_channels, representation_size=m.representation_size, **m.rcnn,
    )
    if encoder.source is not None:
        load_encoder_backbone(detector, backbone_state_dict(weights_path(encoder)))
    return detector


@dataclass
class DetectState:
    """What a checkpoint carries besides model, optimizer, scaler and RNG states."""

    global_step: int = 0  # iterations done: the run's position
    epoch: int = 0  # passes over the training set done (the last one may be cut short)
    metrics: dict[str, float] = field(default_factory=dict)  # the latest evaluation


def per_class_keys(prefix: str, classes: list[str]) -> list[str]:
    """One MLflow metric name per class, `prefix.<class>`: characters MLflow refuses become '_', and a
    name that clashes after that gets its label number."""
    safe = [re.sub(r"[^\w.\- ]", "_", c).strip(". ") or "_" for c in classes]
    return [f"{prefix}.{s}" if safe.count(s) == 1 else f"{prefix}.{s}_{i + 1}" for i, s in enumerate(safe)]


def evaluate_detector(model: nn.Module, val: Dataset, cfg: DetectConfig, device: torch.device,
                      classes: list[str]) -> dict | None:
    """AP metrics of `model` on `val`: every rank predicts its share of the images, rank 0 merges and
    scores them (the other ranks get None). VOC adds its 11-point metrics as VOC07_* and the AP50 of
    each class (of `classes`) that has an object to find as VOC07_AP50.<class>."""
    rank, world = rank_world()
    mine = Subset(SkipCorrupt(val), range(rank, len(val), world))  # type: ignore[arg-type]
    # a private generator: creating a loader must not draw from the training RNG (exact resume)
    loader = DataLoader(mine, batch_size=cfg.eval.batch_size, collate_fn=collate_detection,
                        num_workers=cfg.data.loader_workers, generator=torch.Generator())
    t0 = time.perf_counter()
    dtype = AMP_DTYPES[cfg.run.amp]
    merged = gather_on_rank0(*evaluate(unwrap(model), loader, device=device, autocast_dtype=dtype))
    if merged is None:
        return None
    predictions, truth = merged
    metrics = coco_metrics(truth, predictions)
    if cfg.data.name == "voc":
        metrics.update({f"VOC07_{k}": v for k, v in voc07_metrics(truth, predictions).items()})
        keys = per_class_keys("VOC07_AP50", classes)
        metrics.update({keys[label - 1]: ap for label, ap in voc07_ap(truth, predictions)[1].items()})
    return {**metrics, "eval_time_s": time.perf_counter() - t0}


def _batches(loader: DataLoader, faults: Faults, epoch: int, rank: int, first_step: int):
    """The loader's batches, with the test-only faults (a crash in this pass, NaN images at a step)."""
    for i, (images, targets, skipped) in enumerate(loader):
        if i == 1:
            faults.maybe_crash(epoch, rank)
        yield [faults.poison(im, first_step + i, rank) for im in images], targets, skipped


def restore(checkpoint, model: nn.Module, optimizer, scaler, rank: int) -> DetectState:
    with checkpoint.as_directory() as ckpt_dir:
        return DetectState(**restore_training_checkpoint(ckpt_dir, rank, model, optimizer, scaler))


def save_checkpoint(model: nn.Module, optimizer, scaler, state: DetectState, metrics: dict, meta: dict,
                    rank: int) -> None:
    """Report `metrics` to Ray with a checkpoint named after the iteration: every rank writes its RNG
    state, rank 0 the rest."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        save_training_checkpoint(
            tmp, rank=rank,
            model_state=unwrap(model).state_dict() if rank == 0 else None,
            optimizer_state=optimizer.state_dict() if rank == 0 else None,
            scaler_state=scaler.state_dict() if rank == 0 else None,
            train_state=asdict(state), meta={**meta, "metrics": metrics},
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{state.global_step:07d}")


def _log_start(logger: MetricLogger, train: DetectionSet, val: DetectionSet, cfg: DetectConfig,
               encoder: EncoderSource, norm: str, world: int, steps_per_epoch: int, total: int) -> None:
    """What the run is about to train on: the classes (classes.txt) and the annotation counts (what was
    clipped, dropped, skipped)."""
    counts = {f"annotations.train.{k}": v for k, v in train.counts.as_dict().items()}
    counts.update({f"annotations.val.{k}": v for k, v in val.counts.as_dict().items()})
    logger.metrics(counts, step=0)
    logger.tags({NORM_TAG: norm, "mocoray.world_size": world, "mocoray.num_classes": train.num_classes})
    if logger.uri and logger.run_id:
        safely(f"logging {CLASSES_ARTIFACT}", log_text, logger.uri, logger.run_id, CLASSES_ARTIFACT,
               "".join(f"{c}\n" for c in train.classes))
    runtime.console(
        f"detection ({cfg.model.layout}, norm {norm}) from {encoder.label}: {encoder.arch}, "
        f"{train.num_classes} classes, {train.counts.images} train images / {train.counts.boxes} boxes, "
        f"{val.counts.images} val images, {world} worker(s), {steps_per_epoch} iterations/pass, "
        f"{total} in all"
    )


def _epoch_line(m: dict, total: int) -> str:
    ap = f"  AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}  AP75 {m['AP75']:.4f}" if "AP" in m else ""
    return (f"epoch {m['epoch']}  iter {m['global_step']}/{total}  loss {m['loss']:.4f}{ap}  "
            f"lr {m['lr']:.4g}  {m['images_per_s']:.1f} images/s  {m['epoch_time_s']:.1f}s")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = DetectConfig.model_validate(loop_config["cfg"])
    encoder = EncoderSource(**loop_config["encoder"])
    faults = Faults(**loop_config["faults"])
    rank, world = rank_world()
    runtime.start_worker_console(loop_config, rank)
    device = runtime.worker_device(cfg.run)
    norm = cfg.model.effective_norm(cfg.run)

    train_set, val_set = detection_splits(cfg.data)
    train, val = take(train_set, cfg.data.max_images), take(val_set, cfg.data.max_val_images)
    model = build_model(cfg, encoder, train_set.num_classes, norm).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                momentum=cfg.optim.sgd_momentum, weight_decay=cfg.optim.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.run.amp == "fp16" and device.type == "cuda")
    torch.manual_seed(cfg.run.seed * 1000 + 1 + rank)  # flips, image sizes, RoI sampling differ per rank

    state = DetectState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = restore(checkpoint, model, optimizer, scaler, rank)
        if rank == 0:
            runtime.console(f"resumed after iteration {state.global_step} (pass {state.epoch})")
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)

    per_worker = cfg.optim.batch_size // world
    sampler = DistributedSampler(range(len(train)), num_replicas=world, rank=rank,  # type: ignore[arg-type]
                                 shuffle=True, seed=cfg.run.seed)
    steps_per_epoch = math.ceil(sampler.num_samples / per_worker)
    total = cfg.optim.total_iterations(steps_per_epoch)

    def lr_fn(step: int) -> float:  # lr_at's "epochs" are iterations here: detection schedules count those
        o = cfg.optim
        return lr_at(step, o.lr, total, o.schedule, o.warmup, o.milestones, o.gamma)

    meta = {"config": cfg.model_dump(mode="json"), "encoder": loop_config["encoder"], "norm_effective": norm,
            "classes": list(train_set.classes), "world_size": world, "mocoray": __version__,
            "torch": torch.__version__}
    logger = None
    if rank == 0:
        logger = MetricLogger(loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id"))
        log_environment(loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id"), world, device)
    if state.global_step == 0:
        if logger:
            _log_start(logger, train_set, val_set, cfg, encoder, norm, world, steps_per_epoch, total)
        if cfg.eval.at_start:
            evaluated = evaluate_detector(model, val, cfg, device, val_set.classes)
            if logger and evaluated:
                logger.metrics(evaluated, step=0)
                runtime.console(f"before training: AP {evaluated['AP']:.4f}  AP50 {evaluated['AP50']:.4f}")

    items = SkipCorrupt(train)
    for epoch in range(state.global_step // steps_per_epoch, cfg.optim.passes(steps_per_epoch)):
        sampler.set_epoch(epoch)
        # this pass's share of the iterations, minus what a resumed checkpoint already did of it
        start = state.global_step - epoch * steps_per_epoch
        stop = min(steps_per_epoch, total - epoch * steps_per_epoch)
        order = list(sampler)[start * per_worker : stop * per_worker]
        loader = DataLoader(items, batch_size=per_worker, sampler=order, collate_fn=collate_detection,
                            num_workers=cfg.data.loader_workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.run.seed + epoch))
        t0 = time.perf_counter()
        try:
            stats = train_one_epoch(
                model, optimizer, _batches(loader, faults, epoch, rank, state.global_step), device=device,
                lr_at=lr_fn, global_step=state.global_step, scaler=scaler,
                autocast_dtype=AMP_DTYPES[cfg.run.amp], clip_grad_norm=cfg.optim.clip_grad_norm,
            )
        except NonFiniteLossError as err:
            if rank == 0:
                runtime.write_status(loop_config["status_url"],
                                     {"status": "nonfinite_loss", "epoch": epoch + 1, "message": str(err)})
                if logger:
                    logger.tags({STATUS_TAG: "nonfinite_loss"})
                runtime.console(f"stopping: {err}")
            return
        train_s = time.perf_counter() - t0
        images, skipped = all_reduce_sum([stats.images, stats.skipped], device)
        state.global_step, state.epoch = stats.global_step, epoch + 1
        last = state.global_step >= total
        evaluated = state.epoch % cfg.eval.every == 0 or last
        if evaluated:
            state.metrics = evaluate_detector(model, val, cfg, device, val_set.classes) or {}
        metrics = {"epoch": state.epoch, "global_step": state.global_step, "loss": stats.loss, **stats.losses,
                   "lr": lr_fn(state.global_step - 1), "images_per_s": images / train_s,
                   "corrupt_images_skipped": skipped, **(state.metrics if evaluated else {}),
                   "epoch_time_s": time.perf_counter() - t0}
        if logger:
            logger.metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=state.epoch)
            runtime.console(_epoch_line(metrics, total))
        if state.epoch % cfg.run.checkpoint_every == 0 or last:
            save_checkpoint(model, optimizer, scaler, state, metrics, meta, rank)
        else:
            ray.train.report(metrics)
    if rank == 0:
        runtime.write_status(loop_config["status_url"], {"status": "completed", "epoch": state.epoch,
                                                         "step": state.global_step, **state.metrics})
