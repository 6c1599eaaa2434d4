"""MoCo pretraining as a Ray Train job, the driver: `run_pretrain`.

Validated config -> MLflow run -> TorchTrainer(`loop.train_loop_per_worker`, ScalingConfig, RunConfig) -> fit ->
export of the backbone -> result. Everything that can be checked without Ray is checked before Ray starts.
Mid-epoch checkpoints (a spot reclaim notice, `run.checkpoint_every_steps`) record the step within the
epoch; with `data.loader: torch` the epoch's global sample order does not depend on the number of workers
(`data.sampler`), so a run resumes exactly where it stopped, on any world size of its elastic range
(`data.loader: ray` serves the same order: docs/design.md, Ray Data ingest).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from ... import storage
from ...checkpoints import (
    checkpoint_epoch,
    newest_complete_checkpoint,
    newest_good_checkpoint,
)
from ...config import PretrainConfig, dump_yaml, flatten
from ...config.pretrain import QUEUE_ONLY_FIELDS
from ...data import build_pretrain_data
from ...data.fingerprint import dataset_records
from ...data.ray_ingest import ingest_dataset, start_clock
from ...encoders import export_backbone
from ...tracking.artifacts import encoder_info, record_encoder, record_job_start
from ...tracking.client import (
    BACKBONE_TAG,
    CHECKPOINT_TAG,
    JOB_TAG,
    RESUMED_WITH_TAG,
    RUN_DIR_TAG,
    STATUS_TAG,
    MetricLogger,
    TrackingUnavailableError,
    require_server,
    resolve_tracking_uri,
    run_status,
    safely,
    start_run,
)
from ...tracking.describe import SOURCE_NAME_TAG, source_name, update_description
from ...tracking.outbox import UNSENT_FILE
from .. import interrupts, runtime
from ..faults import Faults
from ..preemption import RECORD_FILE
from ..preflight import check_pretrain_inputs
from ..resume import ResumePoint, find_resume_point, record_config
from .loop import train_loop_per_worker
from .views import augment_spec


@dataclass
class PretrainResult:
    run_dir: str
    checkpoint: str | None
    metrics: dict[str, Any]
    status: str
    mlflow_run_id: str | None
    tracking_uri: str | None
    backbone_path: str | None
    unsent_metrics: str | None = None  # file of what the tracking server never took (None: everything arrived)


class PretrainFailed(RuntimeError):
    """The job did not complete; `result` holds what it left behind (checkpoint, MLflow run), if anything."""

    exit_code = 1

    def __init__(self, message: str, result: PretrainResult | None = None) -> None:
        super().__init__(message)
        self.result = result


NAME_FREED = " No checkpoint was written, so the run's folder is removed: the same command starts it afresh."


class PretrainInterrupted(PretrainFailed):
    """SIGINT / SIGTERM stopped the job; the process should exit with `exit_code` (130 / 143)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def with_absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    """A copy whose local paths are absolute: Ray workers run in their own scratch directories."""
    cfg = cfg.model_copy(deep=True)
    for section, name in (("data", "root"), ("data", "val_root"), ("run", "storage_path")):
        obj = getattr(cfg, section)
        if getattr(obj, name):
            setattr(obj, name, storage.absolute(getattr(obj, name)))
    return cfg


def ingest_dataset_of(cfg: PretrainConfig, clock):
    """The Ray Dataset of `data.loader: ray`: whole global batches of two-view rows per epoch, the epoch (and
    first step) of each pass set on `clock` by the training workers."""
    train = build_pretrain_data(cfg.data).train
    return ingest_dataset(train, len(train) // cfg.optim.batch_size * cfg.optim.batch_size, augment_spec(cfg),
                          cfg.data.augment, cfg.run.seed, cfg.data.ingest.num_cpus, cfg.data.ingest.resources,
                          cfg.data.ingest.batch_rows, cfg.optim.batch_size, clock)


def close_tracking(job: runtime.JobRun, status: str, tags: dict[str, str]) -> str | None:
    """Send what the workers could not (the server may be back), the final tags, then close the MLflow run.

    Returns the file of what the server still did not take (the MLflow run then stays RUNNING), or None.
    A run that did not complete and was already ended elsewhere (a trial Tune stopped early, which the sweep
    marks KILLED) keeps that status and those tags."""
    if not job.mlflow_run_id:
        return None
    logger = MetricLogger(job.tracking_uri, job.mlflow_run_id, storage.join(job.run_dir, UNSENT_FILE))
    ended_elsewhere = status != "FINISHED" and safely(
        "status of the run", run_status, job.tracking_uri, job.mlflow_run_id) not in (None, "RUNNING")
    if not ended_elsewhere:
        logger.tags(tags)
    unsent = logger.unsent()
    if unsent is None and not ended_elsewhere:
        job.end_tracking(status, {})
    return unsent


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

    Everything that can be checked without Ray is checked first, and nothing (run folder, MLflow run) is
    created before Ray is reached. SIGINT / SIGTERM stop the Ray job and raise PretrainInterrupted.
    """
    cfg = with_absolute_paths(cfg)
    run_dir = runtime.run_dir_of(cfg.run)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri) if cfg.tracking.enabled else None
    if uri:
        try:
            require_server(uri)
        except TrackingUnavailableError as err:
            raise PretrainFailed(str(err)) from None
    if resume == "auto":
        resume = storage.exists(run_dir)
    for warning in check_pretrain_inputs(cfg, resume_from):
        print(f"[mocoray] warning: {warning}", file=sys.stderr)
    try:
        runtime.check_run_dir(run_dir, cfg.run.name, bool(resume))
    except (FileExistsError, FileNotFoundError) as err:
        raise PretrainFailed(str(err)) from None
    point = find_resume_point(run_dir, cfg) if resume else None
    for name, value in (point.changed if point else {}).items():
        print(f"[mocoray] resuming with {name}={value}", file=sys.stderr)
    for path, problem in (point.damaged if point else []):
        print(f"[mocoray] warning: checkpoint {path} cannot be loaded ({problem}); resuming from the newest good "
              f"one before it, {point.checkpoint}", file=sys.stderr)  # type: ignore[union-attr]

    runtime.init_ray(address)
    with interrupts.signals_raise():
        job = None
        try:
            job = runtime.JobRun.prepare(cfg.run, bool(resume))
            return _fit(job, cfg, point, resume_from, extra_tags, callbacks, faults)
        except interrupts.JobInterrupted as sig:
            raise _interrupted(job, sig, point) from None


def _open_tracking(job: runtime.JobRun, cfg: PretrainConfig, point: ResumePoint | None,
                   extra_tags: dict[str, str] | None) -> None:
    """Create (or, resumed, reopen) the MLflow run, with the fields this resume changed as a tag."""
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    tags = {JOB_TAG: "pretrain", RUN_DIR_TAG: job.run_dir, SOURCE_NAME_TAG: source_name("pretrain"),
            **(extra_tags or {})}
    if point and point.resumed_with:
        tags[RESUMED_WITH_TAG] = json.dumps(point.resumed_with, sort_keys=True)
    params = flatten(cfg.model_dump(mode="json"))
    if cfg.moco.version == "v3":  # no queue: a K of 65536 beside a v3 run in `compare` would be a false reading
        params = {k: v for k, v in params.items() if k.removeprefix("moco.") not in QUEUE_ONLY_FIELDS}
    job.open_tracking(uri, start_run, uri, cfg.tracking.experiment, cfg.run.name, params, tags, job.run_dir)
    record_job_start(job.tracking_uri, job.mlflow_run_id, dump_yaml(cfg),
                     lambda: dataset_records(cfg.data, pretraining=True))
    update_description(job.tracking_uri, job.mlflow_run_id)


def _fit(job: runtime.JobRun, cfg: PretrainConfig, point: ResumePoint | None, resume_from: str | None,
         extra_tags: dict[str, str] | None, callbacks: list | None, faults: Faults | None) -> PretrainResult:
    record_config(job.run_dir, cfg, point.resumed_with if point else {})
    if cfg.tracking.enabled:
        _open_tracking(job, cfg, point, extra_tags)
    clock = start_clock() if cfg.data.loader == "ray" else None
    loop_config = job.loop_config(cfg=cfg.model_dump(mode="json"), resume_from=resume_from, run_dir=job.run_dir,
                                  newest_checkpoint=point.checkpoint if point else None,
                                  faults=(faults or Faults()).to_dict(),
                                  preemption_record=storage.join(job.run_dir, RECORD_FILE),
                                  unsent_url=storage.join(job.run_dir, UNSENT_FILE), ingest_clock=clock)
    trainer = runtime.make_torch_trainer(train_loop_per_worker, loop_config, cfg.run, job.storage_path, callbacks,
                                         resize_check_s=cfg.run.resize_check_s if cfg.run.elastic else None,
                                         max_preemptions=cfg.run.max_preemptions,
                                         datasets={"train": ingest_dataset_of(cfg, clock)} if clock else None)
    try:
        result = runtime.fit(trainer)
    except Exception as err:
        # a run already ended elsewhere keeps its status: Tune's early stop ends a trial's run KILLED, and
        # the trial's own process may see its Train controller torn down (and fail) after that
        stopped = bool(job.mlflow_run_id) and safely(
            "status of the run", run_status, job.tracking_uri, job.mlflow_run_id) not in (None, "RUNNING")
        job.end_tracking("FAILED", {STATUS_TAG: "failed"}, only_if_running=True)
        # ... and its folder and run key: a trial stopped at its first report (its first checkpoint cut short)
        # is not a failure to run again, and the sweep finds the trial's run by that key
        freed = NAME_FREED if not stopped and job.free_name_unless_checkpointed(point is not None) else ""
        raise PretrainFailed(f"pretraining run {cfg.run.name!r} failed: {err}{freed}") from err

    status = job.status() or {"status": "unknown"}
    # the newest good checkpoint on disk is at least as new as Ray's latest registered one (unless that is
    # damaged); a damaged one further on than this run trained to is passed over
    checkpoint = newest_good_checkpoint(job.run_dir)[0] or runtime.checkpoint_url(result, job.storage_path)
    backbone_path = None
    if checkpoint and status["status"] == "completed":
        backbone_path = storage.join(job.run_dir, "backbone.pt")
        export_backbone(checkpoint, backbone_path)
    final_tags = {STATUS_TAG: status["status"]}
    if checkpoint:
        final_tags[CHECKPOINT_TAG] = checkpoint
    if backbone_path:
        final_tags[BACKBONE_TAG] = backbone_path
        if cfg.tracking.log_backbone:
            info = encoder_info(cfg.model.arch, cfg.model.cifar_stem, job.mlflow_run_id, checkpoint)
            record_encoder(job.tracking_uri, job.mlflow_run_id, backbone_path, info)
    unsent = close_tracking(job, "FINISHED" if status["status"] == "completed" else "FAILED", final_tags)
    update_description(job.tracking_uri, job.mlflow_run_id)
    out = PretrainResult(run_dir=job.run_dir, checkpoint=checkpoint, metrics=dict(result.metrics or {}),
                         status=status["status"], mlflow_run_id=job.mlflow_run_id, tracking_uri=job.tracking_uri,
                         backbone_path=backbone_path, unsent_metrics=unsent)
    if status["status"] == "nonfinite_loss":
        freed = NAME_FREED if job.free_name_unless_checkpointed(point is not None) else ""
        raise PretrainFailed(
            f"stopped: non-finite loss at epoch {status['epoch']}, step {status['step']} ({status['message']}). "
            f"The last good checkpoint is kept: {checkpoint or 'none was written yet'}. "
            f"Lower optim.lr, enable optim.clip_grad_norm, or check the data.{freed}",
            out,
        )
    return out


def _interrupted(job: runtime.JobRun | None, sig: interrupts.JobInterrupted,
                 point: ResumePoint | None) -> PretrainInterrupted:
    """Stop the Ray job, then mark the run: status file, MLflow run KILLED (mocoray.status=interrupted) with
    its newest complete checkpoint, and a message that says how to continue."""
    interrupts.stop_ray()
    head = f"interrupted ({sig.name}): the Ray job is stopped"
    if job is None:
        return PretrainInterrupted(head + " before the run started.", sig.exit_code)
    newest = newest_complete_checkpoint(job.run_dir)
    job.mark_interrupted(sig.name, {CHECKPOINT_TAG: newest} if newest else None)
    if newest:
        how = (f"The newest complete checkpoint is {newest} (epoch {checkpoint_epoch(newest)}); continue the run "
               "with the same command and --resume.")
    elif job.free_name_unless_checkpointed(point is not None):
        how = NAME_FREED.strip()
    else:
        how = "The run has no complete checkpoint yet; --resume starts it from its first epoch."
    tracked = " and its MLflow run marked KILLED" if job.mlflow_run_id else ""
    return PretrainInterrupted(f"{head}{tracked}. {how}", sig.exit_code)
