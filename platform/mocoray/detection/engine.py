"""Detection training and inference loops in pure torch, for torchvision's detectors (possibly in DDP).

Batches are `(images, targets, skipped)` as `data.detection.collate_detection` makes them: uint8
images of any size and target dicts (only `boxes` and `labels` reach the model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..core.moco import NonFiniteLossError, count_nonfinite_ranks


@dataclass
class DetectionEpoch:
    loss: float  # mean over steps of the summed losses
    losses: dict[str, float] = field(default_factory=dict)  # mean of each of torchvision's loss terms
    steps: int = 0
    images: int = 0
    skipped: int = 0  # corrupt images replaced by SkipCorrupt
    global_step: int = 0  # after the epoch


def to_model_inputs(
    images: list[torch.Tensor], targets: list[dict] | None, device: torch.device | str
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]] | None]:
    """float 0..1 images on `device` (the detector normalises them itself) and boxes/labels targets."""
    floats = [im.to(device, non_blocking=True).float().div_(255) if im.dtype == torch.uint8 else im.to(device)
              for im in images]
    if targets is None:
        return floats, None
    return floats, [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple],
    *,
    device: torch.device | str = "cpu",
    lr_at: Callable[[int], float] | None = None,
    global_step: int = 0,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    clip_grad_norm: float | None = None,
    max_steps: int | None = None,
) -> DetectionEpoch:
    """One pass over `batches`: sum torchvision's losses, step. `lr_at(step)` sets the learning rate of
    every parameter group before each step (detection schedules count iterations: warmup, steps).

    A NaN or infinite loss on any rank raises NonFiniteLossError on all ranks before the step."""
    model.train()
    totals: dict[str, float] = {}
    result = DetectionEpoch(loss=0.0, global_step=global_step)
    device_type = torch.device(device).type
    for images, targets, skipped in batches:
        if max_steps is not None and result.steps >= max_steps:
            break
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(result.global_step)
        images, targets = to_model_inputs(images, targets, device)
        amp = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with amp:
            loss_dict = model(images, targets)
        loss = sum(v.float() for v in loss_dict.values())
        # one host sync per step for the finiteness check and every logged number
        bad, *values = torch.stack(
            [count_nonfinite_ranks(loss), loss.detach(), *(v.detach().float() for v in loss_dict.values())]
        ).tolist()
        if bad:
            named = dict(zip(["total", *loss_dict], values, strict=True))
            raise NonFiniteLossError(f"detection loss is non-finite on {int(bad)} rank(s) at step "
                                     f"{result.global_step} ({named}); stopping before it reaches the "
                                     "weights")
        optimizer.zero_grad(set_to_none=True)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            if clip_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
            optimizer.step()
        for name, value in zip(["total", *loss_dict], values, strict=True):
            totals[name] = totals.get(name, 0.0) + value
        result.steps += 1
        result.global_step += 1
        result.images += len(images)
        result.skipped += int(skipped)
    if result.steps:
        result.loss = totals.pop("total") / result.steps
        result.losses = {k: v / result.steps for k, v in totals.items()}
    return result


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple], *, device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, dict]]:
    """(predictions, ground truth), both {image_id: dict} on the CPU, for `detection.evaluation`.

    Keyed by image id, so the duplicates a DistributedSampler pads with, or a skipped corrupt image's
    stand-in, count once when the ranks' dicts are merged."""
    model.eval()
    device_type = torch.device(device).type
    predictions, ground_truth = {}, {}
    for images, targets, _ in batches:
        inputs, _ = to_model_inputs(images, None, device)
        with torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else nullcontext():
            outputs = model(inputs)
        for target, out in zip(targets, outputs, strict=True):
            image_id = int(target["image_id"])
            predictions[image_id] = {k: v.float().cpu() if v.is_floating_point() else v.cpu()
                                     for k, v in out.items()}
            ground_truth[image_id] = target
    return predictions, ground_truth


def gather_on_rank0(
    predictions: dict[int, dict], ground_truth: dict[int, dict]
) -> tuple[dict[int, dict], dict[int, dict]] | None:
    """Every rank's `evaluate` output merged on rank 0 (None on the other ranks; the dicts themselves on
    one process). Merging by image id drops the duplicates a DistributedSampler pads with."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return predictions, ground_truth
    rank = dist.get_rank()
    parts: list | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object((predictions, ground_truth), parts, dst=0)
    if parts is None:
        return None
    merged_predictions: dict[int, dict] = {}
    merged_truth: dict[int, dict] = {}
    for part_predictions, part_truth in parts:
        merged_predictions.update(part_predictions)
        merged_truth.update(part_truth)
    return merged_predictions, merged_truth
