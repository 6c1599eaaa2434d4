"""Detection transfer as a Ray Train job: the driver, `run_detection` (the worker is `loop.py`).

Driver: check the dataset paths and (VOC) its class list, resolve the encoder (`encoders.py`), build the
detector with the encoder's weights once (a missing folder, a bad class list or an unfit checkpoint
fails before Ray starts), open the MLflow run with its lineage tags, fit a TorchTrainer, link the pretraining run back, close the run.
Worker: detection splits -> torchvision Faster R-CNN (C4 or FPN, `detection/model.py`) whose backbone
holds the encoder's weights, DDP across workers -> passes of `detection.engine.train_one_epoch` under an
iteration-counted schedule -> `evaluate` on the validation split (every rank predicts its share, rank 0
scores the merged predictions: COCO AP / AP50 / AP75, and the VOC07 11-point metrics for VOC) ->
report (+ checkpoint) to Ray; rank 0 logs to MLflow.

The run's position is its iteration count: a resumed or restarted run continues mid-pass exactly where
its checkpoint was taken (same data order, same RNG states), so it ends with the weights an
uninterrupted run ends with.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

from ... import storage
from ...config.detect import PATH_FIELDS, DetectConfig, DetectDataConfig
from ...data import check_paths
from ...data.detection import (
    check_voc_sets,
)
from ...data.fingerprint import detection_records
from ...encoders import EncoderSource, resolve_encoder
from ...tracking.client import STATUS_TAG, safely
from ...tracking.registry import tag_versions_with_results
from .. import runtime
from ..downstream import downstream_trainer, link_back, open_downstream_run, run_guarded
from ..faults import Faults
from .loop import build_model, train_loop_per_worker, voc_classes

DETECTION_RUN_TAG = "mocoray.detection_run_id"  # set on the pretraining run: its newest detection transfer
DETECTOR_CHECKPOINT_TAG = "mocoray.detector_checkpoint"  # the detection run's own final checkpoint


class DetectionFailed(RuntimeError):
    """The detection run did not complete; `result` holds what it left behind, if anything."""

    def __init__(self, message: str, result: DetectionResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class DetectionResult:
    run_dir: str
    checkpoint: str | None  # this run's final checkpoint (the trained detector)
    metrics: dict[str, Any]
    status: str
    mlflow_run_id: str | None
    tracking_uri: str | None
    encoder: EncoderSource


def with_absolute_paths(cfg: DetectConfig) -> DetectConfig:
    """A copy whose local dataset paths are absolute: Ray workers run in their own scratch directories."""
    cfg = cfg.model_copy(deep=True)
    for name in PATH_FIELDS:
        if getattr(cfg.data, name):
            setattr(cfg.data, name, storage.absolute(getattr(cfg.data, name)))
    return cfg


def check_data(data: DetectDataConfig) -> None:
    """Missing dataset paths (and, for VOC, year folders and split files), named before Ray starts."""
    check_paths(data, PATH_FIELDS)  # type: ignore[arg-type]
    if data.name == "voc":
        check_voc_sets(str(data.root), data.train_sets, "data.root")
        val_field = "data.val_root" if data.val_root else "data.root"
        check_voc_sets(str(data.val_root or data.root), data.val_sets, val_field)


def _open_mlflow_run(cfg: DetectConfig, encoder: EncoderSource, run_dir: str, uri: str,
                     classes_from: str | None = None) -> str:
    params = {"model.norm_effective": cfg.model.effective_norm(cfg.run)}
    if classes_from:
        params["data.classes_from"] = classes_from
    return open_downstream_run(uri, cfg, encoder, run_dir, "detection",
                               params=params)


def classes_from(data: DetectDataConfig) -> str | None:
    """Where a VOC run's classes come from (None for other data): read, checked and said on the console
    before Ray starts, so a bad labels.txt, or one that data.classes overrides, is seen at once."""
    if data.name != "voc":
        return None
    classes = voc_classes(data)
    if classes.note:
        print(f"[mocoray] warning: {classes.note}", file=sys.stderr)
    shown = ", ".join(classes.names[:10]) + (", ..." if len(classes.names) > 10 else "")
    print(f"[mocoray] {len(classes.names)} classes from {classes.source}: {shown}")
    return f"{classes.source} ({classes.note})" if classes.note else classes.source


def run_detection(cfg: DetectConfig, address: str | None = None, resume: bool = False,
                  faults: Faults | None = None) -> DetectionResult:
    """Run (or, with `resume`, continue) one detection transfer; returns where its results are (raises
    DetectionFailed otherwise). `faults` injects failures (tests only)."""
    cfg = with_absolute_paths(cfg)
    check_data(cfg.data)
    source = classes_from(cfg.data)
    encoder = resolve_encoder(cfg.encoder, cfg.tracking)
    # build once here, on plain BN (SyncBatchNorm needs the GPU workers): a checkpoint of another
    # architecture, or detector options that do not fit it, fail before Ray starts
    build_model(cfg, encoder, num_classes=1, norm="bn")
    return run_guarded(cfg.run, resume, address, DetectionFailed,
                       lambda job: _fit(job, cfg, encoder, faults or Faults(), resume, source))


def _fit(job: runtime.JobRun, cfg: DetectConfig, encoder: EncoderSource, faults: Faults, resume: bool,
         source: str | None) -> DetectionResult:
    open_run = partial(_open_mlflow_run, classes_from=source)
    try:
        result = runtime.fit(downstream_trainer(job, cfg, encoder, faults, open_run,
                                                   lambda: detection_records(cfg.data), train_loop_per_worker))
    except Exception as err:  # nothing to resume unless a checkpoint was written
        job.end_tracking("FAILED", {STATUS_TAG: "failed"})
        job.free_name_unless_checkpointed(resume)
        raise DetectionFailed(f"detection run {cfg.run.name!r} failed: {err}") from err

    status = job.status() or {"status": "unknown"}
    checkpoint = runtime.checkpoint_url(result, job.storage_path)
    out = DetectionResult(run_dir=job.run_dir, checkpoint=checkpoint, metrics=dict(result.metrics or {}),
                          status=status["status"], mlflow_run_id=job.mlflow_run_id,
                          tracking_uri=job.tracking_uri, encoder=encoder)
    tags = {STATUS_TAG: status["status"]}
    if checkpoint:
        tags[DETECTOR_CHECKPOINT_TAG] = checkpoint
    if status["status"] != "completed":
        job.end_tracking("FAILED", tags)
        if status["status"] == "nonfinite_loss":
            raise DetectionFailed(
                f"stopped: non-finite loss in pass {status['epoch']} ({status['message']}). The last good "
                f"checkpoint is kept: {checkpoint or 'none was written yet'}. "
                "Lower optim.lr, raise optim.warmup, set optim.clip_grad_norm, or check the data.", out)
        raise DetectionFailed(f"detection run {cfg.run.name!r} ended with status {status['status']!r}", out)
    link_back(job, encoder, DETECTION_RUN_TAG, "detection", out.metrics)
    job.end_tracking("FINISHED", tags)
    if job.mlflow_run_id and encoder.pretrain_run_id:  # registered versions of the encoder show the new AP
        safely("tagging registered versions", tag_versions_with_results, job.tracking_uri, encoder.pretrain_run_id)
    return out
