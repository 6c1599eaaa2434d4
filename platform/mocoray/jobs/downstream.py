"""What the jobs downstream of pretraining (linear evaluation, detection transfer) share: their MLflow run,
opened in the pretraining run's experiment with the lineage tags, and the link back to the pretraining run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import TypeVar

from ..config import dump_yaml, flatten
from ..config.common import RunConfig
from ..encoders import EncoderSource
from ..tracking.artifacts import record_job_start
from ..tracking.client import (
    CHECKPOINT_TAG,
    JOB_TAG,
    PRETRAIN_RUN_TAG,
    RUN_DIR_TAG,
    SWEEP_RUN_TAG,
    MetricLogger,
    client,
    resolve_tracking_uri,
    safely,
    start_run,
)
from ..tracking.describe import SOURCE_NAME_TAG, log_transfer, source_name, update_description
from . import interrupts, runtime
from .runtime import JobRun

R = TypeVar("R")


def run_guarded(run: RunConfig, resume: bool, address: str | None, failed: type[Exception],
                fit: Callable[[JobRun], R]) -> R:
    """The frame of a downstream job once its inputs are checked: refuse a clashing (or, resumed, a missing)
    run name before Ray starts, reach Ray, create the run folder and call `fit(job)`. SIGINT / SIGTERM stop
    the Ray job, mark the run interrupted (MLflow run KILLED) and raise `failed` with exit code 130 / 143;
    a new run that wrote no checkpoint frees its name for the same command."""
    try:
        runtime.check_run_dir(runtime.run_dir_of(run), run.name, resume)
    except (FileExistsError, FileNotFoundError) as err:
        raise failed(str(err)) from None
    runtime.init_ray(address)  # nothing is created before Ray is reached
    with interrupts.signals_raise():
        job = None
        try:
            job = JobRun.prepare(run, resume)
            return fit(job)
        except interrupts.JobInterrupted as sig:
            interrupts.stop_ray()
            if job is not None:
                job.mark_interrupted(sig.name)
                job.free_name_unless_checkpointed(resume)
            err = failed(f"interrupted ({sig.name}): the Ray job is stopped; the same command with --resume "
                         "continues from the last checkpoint, if one was written")
            err.exit_code = sig.exit_code  # type: ignore[attr-defined]
            raise err from None


def open_downstream_run(uri: str, cfg, encoder: EncoderSource, run_dir: str, job: str,
                        params: dict | None = None, tags: dict | None = None) -> str:
    """Create (or, resumed, reopen) the MLflow run of a job on `encoder`: params = the flattened `cfg` + the
    resolved encoder (+ `params`), tags = job, encoder checkpoint, run dir, pretraining run, Source (+ `tags`).
    Returns its id."""
    experiment = (encoder.pretrain_experiment if encoder.pretrain_experiment and not cfg.experiment_given
                  else cfg.tracking.experiment)
    all_params = flatten(cfg.model_dump(mode="json"))
    all_params.update({"encoder.arch": encoder.arch, "encoder.cifar_stem": encoder.cifar_stem,
                       "encoder.checkpoint": encoder.label, **(params or {})})
    all_tags = {JOB_TAG: job, CHECKPOINT_TAG: encoder.label, RUN_DIR_TAG: run_dir,
                SOURCE_NAME_TAG: source_name(job), **(tags or {})}
    if encoder.pretrain_run_id:
        all_tags[PRETRAIN_RUN_TAG] = encoder.pretrain_run_id
    return start_run(uri, experiment, cfg.run.name, all_params, all_tags, run_key=run_dir)


def link_back(job: JobRun, encoder: EncoderSource, tag: str, kind: str, metrics: dict) -> None:
    """Tag the pretraining run with this run's id (`tag`) and log this `kind` of run's (linear | detection)
    headline `metrics` on it as `transfer.*`; then rewrite the descriptions of this run, its pretraining run
    and that run's sweep, which list each other and the results."""
    if not job.mlflow_run_id:
        return
    if encoder.pretrain_run_id:
        uri, pretrain_id = job.tracking_uri, encoder.pretrain_run_id
        MetricLogger(uri, pretrain_id).tags({tag: job.mlflow_run_id})
        safely("logging the transfer results on the pretraining run", log_transfer, uri, pretrain_id, kind, metrics)
        update_description(uri, pretrain_id)
        pretrain = safely("reading the pretraining run", lambda: client(uri).get_run(pretrain_id))
        update_description(uri, pretrain.data.tags.get(SWEEP_RUN_TAG) if pretrain else None)
    update_description(job.tracking_uri, job.mlflow_run_id)


def downstream_trainer(job: JobRun, cfg, encoder: EncoderSource, faults, open_run: Callable[..., str],
                       records: Callable[[], list], train_loop: Callable[[dict], None], datasets: dict | None = None,
                       **loop_fields):
    """Open the job's MLflow run (`open_run(cfg, encoder, run_dir, uri)`) with its config, command line and
    dataset `records` as the run's record, then make its Ray trainer (`datasets`: its Ray Datasets, split across
    the workers; `loop_fields`: more of the workers' loop config)."""
    if cfg.tracking.enabled:
        uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
        job.open_tracking(uri, open_run, cfg, encoder, job.run_dir, uri)
        record_job_start(job.tracking_uri, job.mlflow_run_id, dump_yaml(cfg), records)
        update_description(job.tracking_uri, job.mlflow_run_id)
    loop_config = job.loop_config(cfg=cfg.model_dump(mode="json"), encoder=asdict(encoder), faults=faults.to_dict(),
                                  **loop_fields)
    return runtime.make_torch_trainer(train_loop, loop_config, cfg.run, job.storage_path, datasets=datasets)
