"""What the jobs downstream of pretraining (linear evaluation, detection transfer) share: their MLflow run,
opened in the pretraining run's experiment with the lineage tags, and the link back to the pretraining run."""

from __future__ import annotations

from ..config import flatten
from ..encoders import EncoderSource
from ..tracking import CHECKPOINT_TAG, JOB_TAG, PRETRAIN_RUN_TAG, RUN_DIR_TAG, MetricLogger, start_run
from .runtime import JobRun


def open_downstream_run(uri: str, cfg, encoder: EncoderSource, run_dir: str, job: str, description: str,
                        params: dict | None = None, tags: dict | None = None) -> str:
    """Create (or, resumed, reopen) the MLflow run of a job on `encoder`: params = the flattened `cfg` + the
    resolved encoder (+ `params`), tags = job, encoder checkpoint, run dir, pretraining run (+ `tags`); the
    run's description says it is the `description` of its pretraining run. Returns its id."""
    experiment = (encoder.pretrain_experiment if encoder.pretrain_experiment and not cfg.experiment_given
                  else cfg.tracking.experiment)
    all_params = flatten(cfg.model_dump(mode="json"))
    all_params.update({"encoder.arch": encoder.arch, "encoder.cifar_stem": encoder.cifar_stem,
                       "encoder.checkpoint": encoder.label, **(params or {})})
    all_tags = {JOB_TAG: job, CHECKPOINT_TAG: encoder.label, RUN_DIR_TAG: run_dir, **(tags or {})}
    if encoder.pretrain_run_id:
        all_tags[PRETRAIN_RUN_TAG] = encoder.pretrain_run_id
        all_tags["mlflow.note.content"] = (f"{description} of pretraining run `{encoder.pretrain_run_id}`, "
                                           f"checkpoint `{encoder.label}`.")
    return start_run(uri, experiment, cfg.run.name, all_params, all_tags, run_key=run_dir)


def link_back(job: JobRun, encoder: EncoderSource, tag: str) -> None:
    """Tag the pretraining run with this run's id (`tag`), for people browsing the pretraining run."""
    if job.mlflow_run_id and encoder.pretrain_run_id:
        MetricLogger(job.tracking_uri, encoder.pretrain_run_id).tags({tag: job.mlflow_run_id})
