"""Linear evaluation as a Ray Train job: the driver (`run_linear_eval`, `linear_eval_best`).

Driver: resolve the encoder (`encoders.py`), load it once to fail early, open the MLflow run with its
lineage tags, fit a TorchTrainer, close the run.
Worker (`loop.py`, `features.py`): frozen backbone (eval mode, requires_grad False; a random-init one first gets BN statistics
recomputed on training images) + a new fc layer, optionally after an affine-free BatchNorm of the features
(`linear.feature_norm`; the only trained module, DDP across workers) -> epochs of `train_one_epoch` on
augmented / centre-crop views or on cached centre-crop features -> `evaluate` (top-1 / top-5 on the
validation split) -> a bit-identical check of every backbone tensor (parameters and BN statistics) after
every epoch; any change fails the run.

Protocols (`linear.mode`): `augmented` is the paper's (RandomResizedCrop + flip for training, resize +
centre crop for validation); `center` trains on the centre-crop views instead; `cached` extracts the
centre-crop features once and trains the fc layer on them. `cached` computes the same thing as `center`
(same views, same batches, same fc initialisation; only floating-point rounding differs: exact on CPU,
close on GPUs where TF32 / cuDNN algorithms depend on the batch) but not the same thing as `augmented`,
whose crops change every epoch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from ...config import LinearConfig, load_linear_config
from ...data import labelled_splits, take
from ...data.fingerprint import dataset_records
from ...data.ray_ingest import DistributedSamplerOrder, rows_dataset, start_clock
from ...encoders import EncoderSource, resolve_encoder
from ...table import render_table
from ...tracking.client import (
    STATUS_TAG,
    MetricLogger,
    safely,
)
from ...tracking.registry import tag_versions_with_results
from .. import runtime
from ..downstream import downstream_trainer, link_back, open_downstream_run, run_guarded
from ..faults import Faults
from ..preflight import check_linear_inputs
from .features import build_frozen_backbone, ingest_rows
from .loop import train_loop_per_worker

LINEAR_RUN_TAG = "mocoray.linear_run_id"  # set on the pretraining run: its newest linear evaluation
FC_CHECKPOINT_TAG = "mocoray.fc_checkpoint"  # the linear run's own checkpoint (the trained fc layer)


class LinearEvalFailed(RuntimeError):
    """The linear evaluation did not complete; `result` holds what it left behind, if anything."""

    exit_code = 1  # 130 / 143 when a signal stopped it

    def __init__(self, message: str, result: LinearResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class LinearResult:
    run_dir: str
    checkpoint: str | None  # this run's last checkpoint (the trained fc layer)
    metrics: dict[str, Any]
    status: str
    mlflow_run_id: str | None
    tracking_uri: str | None
    encoder: EncoderSource


def _open_mlflow_run(cfg: LinearConfig, encoder: EncoderSource, run_dir: str, uri: str) -> str:
    return open_downstream_run(uri, cfg, encoder, run_dir, "linear", tags={"mocoray.linear_mode": cfg.linear.mode})


def run_linear_eval(cfg: LinearConfig, address: str | None = None, resume: bool = False,
                    faults: Faults | None = None) -> LinearResult:
    """Run one linear evaluation; returns where its results are (raises LinearEvalFailed otherwise).

    `faults` injects failures (tests only).
    """
    faults = faults or Faults()
    if faults.unfreeze_backbone and cfg.linear.mode == "cached":
        raise ValueError("unfreeze_backbone needs linear.mode augmented or center (cached features never pass "
                         "gradients to the backbone)")
    encoder = resolve_encoder(cfg.encoder, cfg.tracking)
    build_frozen_backbone(encoder, cfg.run.seed, cfg.encoder.vit_pool)  # load once here: a bad file fails before Ray starts
    for warning in check_linear_inputs(cfg):
        print(f"[mocoray] warning: {warning}", file=sys.stderr)
    train = ingest_train_set(cfg) if cfg.data.loader == "ray" else None
    return run_guarded(cfg.run, resume, address, LinearEvalFailed,
                       lambda job: _fit(job, cfg, encoder, faults, resume, train))


def ingest_train_set(cfg: LinearConfig):
    """The training images `data.loader: ray` feeds its ingest tasks (the workers' own `train_raw`), refused
    when they hold no whole global batch (that path trains whole global batches only)."""
    train = take(labelled_splits(cfg.data)[0], cfg.data.max_images)
    if len(train) < cfg.optim.batch_size:
        raise ValueError(f"optim.batch_size={cfg.optim.batch_size} is larger than the {len(train)} training images: "
                         "data.loader='ray' trains whole global batches only")
    return train


def ingest_dataset_of(cfg: LinearConfig, train, clock):
    """The Ray Dataset of `data.loader: ray` (augmented protocol): one training view and the label per sample,
    whole global batches of each epoch, every rank's rows its `DistributedSampler`'s (see `DistributedSamplerOrder`)."""
    world, ingest = cfg.run.num_workers, cfg.data.ingest
    order = DistributedSamplerOrder(cfg.run.seed, world, cfg.optim.batch_size // world, ingest.batch_rows)
    return rows_dataset(train, len(train) // cfg.optim.batch_size * cfg.optim.batch_size, ingest_rows(cfg, train),
                        order, ingest.num_cpus, ingest.resources, ingest.batch_rows, cfg.optim.batch_size, clock)


def _fit(job: runtime.JobRun, cfg: LinearConfig, encoder: EncoderSource, faults: Faults, resume: bool, train
         ) -> LinearResult:
    clock = start_clock() if train is not None else None
    trainer = downstream_trainer(job, cfg, encoder, faults, _open_mlflow_run, lambda: dataset_records(cfg.data),
                                 train_loop_per_worker,
                                 datasets={"train": ingest_dataset_of(cfg, train, clock)} if clock else None,
                                 ingest_clock=clock)
    try:
        result = runtime.fit(trainer)
        error = None
    except Exception as err:
        result, error = None, err
    status = job.status() or {"status": "failed"}
    if error is not None or status["status"] != "completed":
        job.end_tracking("FAILED", {STATUS_TAG: status["status"]})
        job.free_name_unless_checkpointed(resume)
        reason = status.get("message") or str(error)
        raise LinearEvalFailed(f"linear evaluation {cfg.run.name!r} failed ({status['status']}): {reason}")

    checkpoint = runtime.checkpoint_url(result, job.storage_path)
    if job.mlflow_run_id:
        final = {"linear_top1_final": status["linear_top1"], "linear_top5_final": status["linear_top5"]}
        MetricLogger(job.tracking_uri, job.mlflow_run_id).metrics(final, step=status["epoch"])
        link_back(job, encoder, LINEAR_RUN_TAG, "linear",
                  {"linear_top1": status["linear_top1"], "linear_top5": status["linear_top5"]})
    tags = {STATUS_TAG: "completed"}
    if checkpoint:
        tags[FC_CHECKPOINT_TAG] = checkpoint
    job.end_tracking("FINISHED", tags)
    if job.mlflow_run_id and encoder.pretrain_run_id:  # registered versions of the encoder show the new result
        safely("tagging registered versions", tag_versions_with_results, job.tracking_uri, encoder.pretrain_run_id)
    return LinearResult(run_dir=job.run_dir, checkpoint=checkpoint, metrics=dict(result.metrics or {}),
                        status=status["status"], mlflow_run_id=job.mlflow_run_id, tracking_uri=job.tracking_uri,
                        encoder=encoder)


def linear_eval_best(result, sweep, n: int, recipe: str | None, overrides: list[str] | None = None,
                     address: str | None = None) -> list[dict[str, Any]]:
    """Linear evaluation of the best `n` completed trials of a finished sweep (`result`: its SweepResult,
    `sweep`: its SweepConfig); one linear run per trial, linked to its trial's MLflow run (so `compare`
    joins them); without tracking it reads the trial's last checkpoint directly."""
    import fsspec

    col = f"best_{sweep.metric}"
    sign = 1.0 if sweep.mode == "max" else -1.0
    ranked = sorted((r for r in result.trials if r["status"] == "completed" and r[col] is not None),
                    key=lambda r: -sign * r[col])[:n]
    out = []
    for row in ranked:
        values: dict[str, Any] = {"run.name": row["run_dir"].rstrip("/").rsplit("/", 1)[1] + "-linear"}
        if row.get("mlflow_run_id"):
            values.update({"encoder.pretrain_run": row["mlflow_run_id"], "tracking.tracking_uri": result.tracking_uri})
        else:
            fs, run_path = fsspec.core.url_to_fs(row["run_dir"])
            checkpoints = sorted(fs.glob(run_path + "/epoch_*"))
            if not checkpoints:
                print(f"[mocoray] trial {row['trial_id']}: no checkpoint to evaluate")
                continue
            last = checkpoints[-1] if "://" not in row["run_dir"] else fs.unstrip_protocol(checkpoints[-1])
            values.update({"encoder.checkpoint": last, "tracking.enabled": False})
        cfg = load_linear_config(recipe, overrides, values)
        try:
            res = run_linear_eval(cfg, address=address)
        except (LinearEvalFailed, LookupError, ValueError) as err:
            print(f"[mocoray] linear evaluation of trial {row['trial_id']} failed: {err}")
            out.append({"trial_id": row["trial_id"], "status": "failed", "error": str(err)})
            continue
        out.append({"trial_id": row["trial_id"], "status": res.status, "mlflow_run_id": res.mlflow_run_id,
                    **{k: res.metrics.get(k) for k in ("linear_top1", "linear_top5")}})
    if out:
        print("\n" + render_table(out, ["trial_id", "linear_top1", "linear_top5", "status"],
                                  cell=lambda _c, v: f"{v:.4g}" if isinstance(v, float) else str(v), missing="-"))
    return out
