"""A study's transfer table read from MLflow alone: one row per sweep trial, its swept values and pretext
metric joined with its linear and detection runs (through `mocoray.pretrain_run_id`), as `transfer.csv`."""

from __future__ import annotations

from typing import Any

from .client import JOB_TAG, PRETRAIN_RUN_TAG, STATUS_TAG, SWEEP_RUN_TAG, client, effective_params
from .compare import DETECTION_METRICS, LINEAR_METRICS, _first, _number, _search_all

STUDY_SWEEP_TAG = "mocoray.study_sweep_run_id"  # on the study run: its sweep's parent run
ERROR_TAG = "mocoray.error"  # on a FAILED downstream run: why it failed
TRIAL_TAG = "mocoray.trial_id"
KIND_JOBS = {"linear": "linear", "detection": "detection"}  # study evaluation -> the runs' mocoray.job
KIND_METRICS = {"linear": LINEAR_METRICS, "detection": DETECTION_METRICS}


def _downstream_run(runs: list) -> Any:
    """The newest FINISHED run of a (trial, evaluation), else the newest of any status (None: none)."""
    if not runs:
        return None
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return max(finished or runs, key=lambda r: r.info.start_time)


def study_columns(space: list[str], metric: str, kinds: list[str]) -> list[str]:
    """The columns of a transfer table, in order."""
    cols = ["trial_id", *space, metric, "status"]
    for kind in kinds:
        cols += list(KIND_METRICS[kind])
    for kind in kinds:
        cols += [f"{kind}_status", f"{kind}_error"]
    return cols + ["trial_run_id", *(f"{kind}_run_id" for kind in kinds)]


def transfer_rows(tracking_uri: str, study_run_id: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, columns) of the study `study_run_id`: what its trial runs and their downstream runs hold."""
    c = client(tracking_uri)
    study = c.get_run(study_run_id)
    sweep_id = study.data.tags.get(STUDY_SWEEP_TAG)
    if not sweep_id:
        raise LookupError(f"run {study_run_id} is not a study run (no {STUDY_SWEEP_TAG} tag); pass the id "
                          "`mocoray study` printed as its MLflow run")
    params = study.data.params
    space, metric, mode = params["study.space"].split(","), params["study.metric"], params["study.mode"]
    kinds = [k for k in KIND_JOBS if params.get(f"{k}.recipe")]
    everywhere = [e.experiment_id for e in c.search_experiments()]
    trials = _search_all(c, everywhere, f"tags.`{SWEEP_RUN_TAG}` = '{sweep_id}'")
    rows = []
    for run in trials:
        trial_params, tags = effective_params(run.data.params, run.data.tags), run.data.tags
        history = [m.value for m in c.get_metric_history(run.info.run_id, metric)]
        pretext = (max(history) if mode == "max" else min(history)) if history else None
        row: dict[str, Any] = {"trial_id": tags.get(TRIAL_TAG)}
        row.update({k: _number(trial_params.get(k)) for k in space})
        row.update({metric: pretext, "status": tags.get(STATUS_TAG, run.info.status.lower())})
        for kind, job in KIND_JOBS.items():
            if kind not in kinds:
                continue
            linked = _search_all(c, everywhere, f"tags.`{JOB_TAG}` = '{job}' and "
                                                f"tags.`{PRETRAIN_RUN_TAG}` = '{run.info.run_id}'")
            down = _downstream_run(linked)
            values = down.data.metrics if down is not None and down.info.status == "FINISHED" else {}
            row.update({name: _first(values, names) for name, names in KIND_METRICS[kind].items()})
            row[f"{kind}_status"] = None if down is None else down.info.status.lower()
            row[f"{kind}_error"] = None if down is None else down.data.tags.get(ERROR_TAG)
            row[f"{kind}_run_id"] = None if down is None else down.info.run_id
        row["trial_run_id"] = run.info.run_id
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"] or "")
    return rows, study_columns(space, metric, kinds)
