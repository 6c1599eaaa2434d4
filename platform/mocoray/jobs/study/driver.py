"""Run a study: the sweep, each chosen trial's linear / detection runs as Ray tasks, then the transfer analysis.

With `trials: all`, a trial's downstream runs start as soon as it finishes (a Tune callback hands it to
the `Downstream` scheduler), beside the trials still running; with `trials: {top: N, ...}` the ranking
needs every trial, so they start when the sweep ends. Each downstream run is an ordinary
`run_linear_eval` / `run_detection` inside a Ray task (its driver), on the trial's MLflow run, so it is
linked to the trial both ways as any downstream run is. A failed one is recorded (a FAILED MLflow run
with `mocoray.error`) and the study goes on.

The study's folder <storage_path>/<name> holds `study.yaml` (what `--resume` reads), `state.json` (each
downstream run's outcome), the sweep's folder, `downstream/` (the downstream runs' folders) and the
analysis. MLflow: a study run (mocoray.job=study) above the sweep's run, which holds `transfer.csv`,
`summary.md`, `plots/`, `best_*_config.yaml` and the correlations as metrics. `--resume` keeps every
finished trial and every FINISHED downstream run (MLflow is asked before each launch) and finishes the rest.
"""


from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ... import storage
from ...config import dump_yaml, flatten
from ...config.study import StudyConfig, dump_study
from ...config.sweep import resolve, trial_base
from ...tracking.artifacts import environment_record, record_job_start
from ...tracking.client import (
    JOB_TAG,
    MLFLOW_PARENT_TAG,
    STATUS_TAG,
    client,
    end_run,
    experiment_id,
    find_run,
    safely,
    start_run,
)
from ...tracking.describe import NOTE_LIMIT, NOTE_TAG, SOURCE_NAME_TAG, source_name
from ...tracking.transfer import STUDY_SWEEP_TAG, transfer_rows
from .. import console
from ..runtime import init_ray, load_job_folder
from ..sweep.driver import TRIALS_CSV, run_sweep, with_absolute_paths
from ..sweep.report import best_config, trial_run_name
from . import analysis
from .downstream import (
    _ACTIVE,
    SUFFIX,
    Downstream,
    DownstreamFault,
    _trial_callback,
    choose_trials,
)

STUDY_FILE = "study.yaml"


TRANSFER_CSV = "transfer.csv"


SUMMARY = "summary.md"


PLOTS_DIR = "plots"


STUDY_RUN_TAG = "mocoray.study_run_id"  # on the sweep's run: the study above it


class StudyFailed(RuntimeError):
    """The study could not start or continue (it exists already, nothing to resume, ...)."""


@dataclass
class StudyResult:
    study_dir: str
    run_id: str | None
    tracking_uri: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    correlations: list[analysis.Correlation] = field(default_factory=list)
    best_configs: dict[str, str] = field(default_factory=dict)  # 'linear' / 'detection' -> recipe path
    plots: list[str] = field(default_factory=list)
    interrupted: bool = False


def _sweep_rows(sweep_dir: str) -> list[dict[str, Any]]:
    """The finished sweep's trial table (its trials.csv), as the sweep returned it."""
    import io

    import pandas as pd

    df = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(sweep_dir, TRIALS_CSV))), dtype={"trial_id": str})
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
            for row in df.to_dict("records")]


def _study_params(study: StudyConfig, metric: str, mode: str) -> dict[str, Any]:
    params = flatten(study.model_dump(mode="json", exclude={"sweep"}, exclude_none=True))
    sweep = study.sweep_config
    params.update({"study.space": ",".join(sweep.space), "study.metric": metric, "study.mode": mode,
                   "sweep.name": sweep.name, "sweep.num_samples": sweep.num_samples})
    return params


def run_study(study: StudyConfig, address: str | None = None, resume: bool = False,
              faults: list[DownstreamFault] | None = None) -> StudyResult:
    """Run (or, with `resume`, continue) a study resolved by `load_study_config`; returns its analysis."""
    study_dir = storage.join(storage.absolute(study.storage_path), study.name)
    study_file = storage.join(study_dir, STUDY_FILE)
    if resume and not storage.exists(study_file):
        raise StudyFailed(f"--resume: {study_dir} is not a study folder (no {STUDY_FILE}); pass the folder "
                          "printed when the study started: <storage_path>/<name>")
    if not resume and storage.exists(study_file):
        raise StudyFailed(f"study {study.name!r} already exists at {study_dir}; continue it with "
                          f"`mocoray study --resume {study_dir}` or choose another name (--set name=...)")
    sweep = with_absolute_paths(resolve(study.sweep_config.model_copy(update={"storage_path": study_dir})))
    base = trial_base(sweep)
    uri, experiment = base.tracking.tracking_uri, base.tracking.experiment
    assert uri, "with_absolute_paths resolves the tracking URI"
    sweep_dir = storage.join(study_dir, sweep.name)
    storage.makedirs(study_dir)
    if not resume:
        storage.write_bytes(study_file, dump_study(study).encode())

    init_ray(address)
    console.run_started(study_dir)
    run_id = start_run(uri, experiment, study.name, _study_params(study, sweep.metric, sweep.mode),
                       {JOB_TAG: "study", "mocoray.study_dir": study_dir, SOURCE_NAME_TAG: source_name("study"),
                        "mlflow.note.content": f"Study `{study.name}`: which {', '.join(sweep.space)} transfer "
                                               f"best to {' and '.join(study.kinds)}."}, run_key=study_dir)
    if not resume:
        record_job_start(uri, run_id, dump_study(study), lambda: [], environment_record())
    scheduler = Downstream(study, study_dir, uri, experiment, faults or [])
    _ACTIVE[study_dir] = scheduler
    print(f"[mocoray] study {study.name!r} in {study_dir}: {' + '.join(study.kinds)} on "
          f"{'every finished trial' if study.trials == 'all' else 'the chosen trials'}, up to "
          f"{scheduler.max_concurrent} downstream run(s) at once; MLflow run {run_id} at {uri}")
    try:
        if storage.exists(storage.join(sweep_dir, TRIALS_CSV)):  # the sweep finished in an earlier attempt
            rows = _sweep_rows(sweep_dir)
        else:
            from ray import tune

            callback = _trial_callback(study_dir, uri, experiment, storage.join(sweep_dir, "train"), sweep.name,
                                       base.optim.epochs, study.include_early_stopped)
            res = run_sweep(sweep, address=address, resume=tune.Tuner.can_restore(sweep_dir),
                            callbacks=[callback] if study.trials == "all" else [],
                            parent_tags={MLFLOW_PARENT_TAG: run_id, STUDY_RUN_TAG: run_id})
            if res.interrupted:
                return _interrupted(uri, run_id, study_dir)
            rows = res.trials
        c = client(uri)
        sweep_run = find_run(c, experiment_id(c, experiment), sweep_dir)
        if sweep_run is None:
            raise StudyFailed(f"the sweep's MLflow run (run key {sweep_dir}) is not at {uri}")
        c.set_tag(run_id, STUDY_SWEEP_TAG, sweep_run)
        for row in choose_trials(rows, study, sweep.metric, sweep.mode):
            scheduler.offer({"trial_id": row["trial_id"], "trial_run_id": row["mlflow_run_id"],
                             "run_name": trial_run_name(sweep.name, row["trial_id"]), "run_dir": row["run_dir"]})
        scheduler.wait()
    except KeyboardInterrupt:
        return _interrupted(uri, run_id, study_dir)
    finally:
        _ACTIVE.pop(study_dir, None)
    return _analyse(study, sweep, study_dir, uri, run_id)


def _interrupted(uri: str, run_id: str, study_dir: str) -> StudyResult:
    safely("end of the study run", end_run, uri, run_id, "KILLED", {STATUS_TAG: "interrupted"})
    print(f"[mocoray] study interrupted; continue it with: mocoray study --resume {study_dir}")
    return StudyResult(study_dir, run_id, uri, interrupted=True)


def _analyse(study: StudyConfig, sweep, study_dir: str, uri: str, run_id: str) -> StudyResult:
    """transfer.csv from MLflow, the correlations, best configs, plots and summary; logged on the study run."""
    import tempfile

    from mlflow.entities import Metric

    from ...table import render_table

    rows, columns = transfer_rows(uri, run_id)
    space, metric = list(sweep.space), sweep.metric
    an = study.analysis
    corrs = analysis.correlations(rows, metric, study.kinds, an.bootstrap_samples, an.confidence, an.seed)
    ranked = {metric: analysis.rank_configs(rows, space, metric, sweep.mode)}
    for kind in study.kinds:
        ranked[analysis.HEADLINE[kind]] = analysis.rank_configs(rows, space, analysis.HEADLINE[kind])

    remote = "://" in study_dir
    out = Path(tempfile.mkdtemp(prefix="mocoray-study-")) if remote else Path(study_dir)
    (out / TRANSFER_CSV).write_text(render_table(rows, columns, "csv"))
    files: list[tuple[Path, str | None]] = [(out / TRANSFER_CSV, None)]
    best_paths: dict[str, str] = {}
    metrics: dict[str, float] = {}
    for kind in study.kinds:
        column = analysis.HEADLINE[kind]
        if not ranked[column]:
            continue
        top = ranked[column][0]
        cfg = best_config(sweep, top.rows[0])
        cfg.run.name = f"{study.name}-best-{SUFFIX[kind]}"
        name = f"best_{kind}_config.yaml"
        (out / name).write_text(f"# Best configuration of study {study.name!r} by {column}: {top.mean:.4f}"
                                + (f" (mean of {top.n} seeds, sd {top.std:.4f})" if top.n > 1 else "")
                                + f".\n# Run it with: mocoray pretrain {storage.join(study_dir, name)}\n"
                                + dump_yaml(cfg))
        files.append((out / name, None))
        best_paths[kind] = storage.join(study_dir, name)
        metrics[f"best_{column}"] = top.mean
        if ranked[metric]:
            metrics[f"pretext_best_is_best_{column}"] = float(ranked[metric][0].values == top.values)
    for corr in corrs:
        if corr.rho is not None:
            metrics[corr.name] = corr.rho
            if corr.low is not None:
                metrics.update({f"{corr.name}_low": corr.low, f"{corr.name}_high": corr.high})
    (out / SUMMARY).write_text(analysis.summary_markdown(study.name, rows, space, metric, sweep.mode, study.kinds,
                                                         corrs, ranked, an.confidence))
    files.append((out / SUMMARY, None))
    plots = analysis.make_plots(rows, sweep, metric, study.kinds, out / PLOTS_DIR)
    files += [(p, PLOTS_DIR) for p in plots]
    if remote:
        import fsspec

        fs, path = fsspec.core.url_to_fs(study_dir)
        fs.put(str(out) + "/", path, recursive=True)

    c = client(uri)
    now = int(time.time() * 1000)
    safely("log of the study's results", c.log_batch, run_id,
           metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    for path, folder in files:
        safely(f"log_artifact {path.name}", c.log_artifact, run_id, str(path), folder)
    failed = sum(r.get(f"{k}_status") == "failed" for r in rows for k in study.kinds)
    safely("end of the study run", end_run, uri, run_id, "FINISHED",
           {STATUS_TAG: "completed" if not failed else f"completed, {failed} downstream run(s) failed",
            # the UI shows the description first: what transfers best, the correlations, the ranking
            NOTE_TAG: (out / SUMMARY).read_text()[:NOTE_LIMIT]})
    console.flush()
    print("\n" + render_table(rows, [c for c in columns if not c.endswith(("_error", "_run_id"))],
                              cell=lambda _c, v: f"{v:.4g}" if isinstance(v, float) else str(v), missing="-"))
    print((out / SUMMARY).read_text())
    if remote:
        import shutil

        shutil.rmtree(out)
    return StudyResult(study_dir, run_id, uri, rows, columns, corrs, best_paths,
                       [storage.join(study_dir, f"{PLOTS_DIR}/{p.name}") for p in plots])


def load_study_dir(path: str) -> StudyConfig:
    """The resolved study saved in a study folder (what `--resume <folder>` continues)."""
    return load_job_folder(path, STUDY_FILE, StudyConfig, "study", StudyFailed)
