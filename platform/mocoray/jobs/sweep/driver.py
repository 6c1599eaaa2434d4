"""Run a sweep: `run_sweep` (driver: Tuner + MLflow parent run + report) and `run_trial` (one Tune trial).

Ray 2.60 / Train V2 pattern: each Tune trial is a function that builds and fits its own TorchTrainer
(`run_pretrain`), with `TuneReportCallback` forwarding every epoch's report to Tune, so every trial is a
distributed Ray Train run and ASHA judges trials by epoch.

The sweep's folder <storage_path>/<name> is Tune's experiment folder; beside Tune's files it holds
`sweep.yaml` (the resolved sweep, what `--resume` reads), `train/<name>-<trial_id>` (each trial's Ray
Train run: deterministic, so a restarted trial continues its own run), `trials.csv`, `best_config.yaml`
and `plots/`. MLflow: one parent run (mocoray.job=sweep; its `config.yaml` is the resolved sweep) and one child run per
trial (mocoray.job=pretrain, the sweep's run id, `mlflow.parentRunId`).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from ... import storage
from ...checkpoints import newest_complete_checkpoint
from ...config import PretrainConfig, SweepConfig, build, dump_yaml
from ...config.common import set_dotted
from ...config.sweep import dump_sweep, max_epochs, resolve, trial_base
from ...data.fingerprint import dataset_records
from ...tracking.artifacts import command_argv, environment_record, record_job_start, set_command_line
from ...tracking.client import (
    CHECKPOINT_TAG,
    JOB_TAG,
    MLFLOW_PARENT_TAG,
    STATUS_TAG,
    SWEEP_RUN_TAG,
    client,
    end_run,
    experiment_id,
    find_run,
    param_value,
    resolve_tracking_uri,
    safely,
    start_run,
)
from ...tracking.describe import SOURCE_NAME_TAG, TRIAL_TAG, source_name, update_description
from .. import console, interrupts
from ..pretrain.driver import run_pretrain
from ..runtime import init_ray, load_job_folder
from .report import best_config, make_plots, pick_best, python_value, trial_rows, trial_run_name, trial_table
from .space import build_scheduler, concurrency, tune_space

SWEEP_FILE = "sweep.yaml"
TRIALS_CSV = "trials.csv"
BEST_CONFIG = "best_config.yaml"
PLOTS_DIR = "plots"
TRAIN_DIR = "train"


class SweepFailed(RuntimeError):
    """The sweep could not start or continue (bad state on disk, nothing to resume, ...)."""


@dataclass
class SweepResult:
    sweep_dir: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config_path: str | None
    parent_run_id: str | None
    tracking_uri: str | None
    plots: list[str] = field(default_factory=list)
    interrupted: bool = False


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def run_trial(config: dict[str, Any], template: dict[str, Any], sweep_name: str, parent_run_id: str | None,
              command: list[str] | None = None, console_sink: dict | None = None, source: str | None = None) -> None:
    """One Tune trial: the template config + this trial's values -> a full pretraining run on Ray Train.

    `command` is the sweep's command line, which the trial's run records as its own; its Source is the
    sweep's `source` + ` trial <id>`; `console_sink` is the sweep's terminal, where the trial's lines go,
    prefixed with its id."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    if command:
        set_command_line(command)
    trial_id = tune.get_context().get_trial_id()
    console.adopt(console_sink, f"[trial {trial_id}] ")
    data = copy.deepcopy(template)
    for key, value in config.items():
        set_dotted(data, key, python_value(value))
    data["run"]["name"] = trial_run_name(sweep_name, trial_id)
    cfg = build(PretrainConfig, data)
    tags = {TRIAL_TAG: trial_id, SOURCE_NAME_TAG: f"{source or source_name('sweep')} trial {trial_id}"}
    if parent_run_id:
        tags.update({SWEEP_RUN_TAG: parent_run_id, MLFLOW_PARENT_TAG: parent_run_id})
    run_pretrain(cfg, resume="auto", extra_tags=tags, callbacks=[TuneReportCallback()])


def _close_child(uri: str, experiment: str, run_key: str, status: str, tags: dict[str, str],
                 only_if_running: bool = False, parent_id: str | None = None, trial_id: str | None = None
                 ) -> str | None:
    """End a trial's MLflow run (found by its run key, else as the newest run of the sweep's `parent_id` tagged
    `trial_id`); returns its id, or None if it has none."""
    c = client(uri)
    exp_id = experiment_id(c, experiment)
    run_id = find_run(c, exp_id, run_key)
    if run_id is None and parent_id and trial_id:  # a trial whose process released its key (it failed early)
        runs = c.search_runs([exp_id], f"tags.`{SWEEP_RUN_TAG}` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
                             order_by=["attributes.start_time DESC"], max_results=1)
        run_id = runs[0].info.run_id if runs else None
    if run_id:
        end_run(uri, run_id, status, tags, only_if_running=only_if_running)
    return run_id


def tag_final_checkpoint(uri: str, run_id: str, run_dir: str) -> None:
    """A trial that Tune stopped at its last epoch (ASHA at max_t) did not run its own epilogue, which tags
    its run with its final checkpoint (what linear evaluation and detection load): tag it with the newest
    complete checkpoint in its folder, as the epilogue would have."""
    c = client(uri)
    if CHECKPOINT_TAG in c.get_run(run_id).data.tags:
        return
    newest = newest_complete_checkpoint(run_dir)
    if newest:
        c.set_tag(run_id, CHECKPOINT_TAG, newest)


def _early_stop_tags(epochs_run: int, epochs: int) -> dict[str, str]:
    return {STATUS_TAG: "early_stopped", "mocoray.epochs_run": str(epochs_run), "mocoray.epochs_planned": str(epochs)}


def _early_stop_marker(uri: str, experiment: str, train_storage: str, sweep_name: str, epochs: int,
                       parent_id: str | None = None):
    """A Tune callback: when Tune stops a trial early, its child run is ended KILLED and tagged early_stopped.

    Tune tears the trial's process (and so its TorchTrainer) down, so the trial cannot end its run itself.
    """
    from ray import tune

    class EarlyStopMarker(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
            planned = int(trial.config.get("optim.epochs", epochs))
            done = int((trial.last_result or {}).get("epoch", 0))
            if done < planned:
                run_key = f"{train_storage}/{trial_run_name(sweep_name, trial.trial_id)}"
                safely("marking a trial early-stopped", _close_child, uri, experiment, run_key, "KILLED",
                       _early_stop_tags(done, planned), parent_id=parent_id, trial_id=trial.trial_id)

    return EarlyStopMarker()


def _parent_params(sweep: SweepConfig, max_concurrent: int) -> dict[str, Any]:
    params: dict[str, Any] = {f"space.{k}": spec.describe() for k, spec in sweep.space.items()}
    params.update({f"scheduler.{k}": v for k, v in sweep.scheduler.model_dump().items()})
    if sweep.scheduler.type == "asha":
        params["scheduler.max_t"] = sweep.scheduler.max_t or max_epochs(sweep)
    params.update({f"resources.{k}": v for k, v in sweep.resources.model_dump().items()})
    params.update({"num_samples": sweep.num_samples, "metric": sweep.metric, "mode": sweep.mode,
                   "max_concurrent_trials": max_concurrent})
    return params


def load_sweep_dir(path: str) -> SweepConfig:
    """The resolved sweep saved in a sweep folder, local or URL (what `--resume <folder>` continues)."""
    return resolve(load_job_folder(path, SWEEP_FILE, SweepConfig, "sweep", SweepFailed))


def with_absolute_paths(sweep: SweepConfig) -> SweepConfig:
    """Storage, data paths and the tracking URI made absolute: a resume from elsewhere finds the same ones."""
    assert isinstance(sweep.base, dict)
    base = copy.deepcopy(sweep.base)
    for key in ("root", "val_root"):
        if base["data"].get(key):
            base["data"][key] = storage.absolute(base["data"][key])  # trials also run in scratch dirs
    tracking = dict(sweep.tracking)
    trial_tracking = trial_base(sweep).tracking
    if trial_tracking.enabled:
        tracking["tracking_uri"] = resolve_tracking_uri(trial_tracking.tracking_uri)
    return sweep.model_copy(update={"base": base, "tracking": tracking,
                                    "storage_path": storage.absolute(sweep.storage_path)})


def run_sweep(
    sweep: SweepConfig,
    address: str | None = None,
    resume: bool = False,
    retry_errored: bool = False,
    callbacks: list | None = None,
    parent_tags: dict[str, str] | None = None,
) -> SweepResult:
    """Run (or with `resume`, continue) a sweep; every check of the space happens before any trial.

    A `base` given as a path is read relative to the working directory. On resume, finished
    trials are kept as they are, unfinished ones continue their own Ray Train runs, errored ones are
    retried only with `retry_errored`. `callbacks` are more Tune callbacks (a study's, which starts each
    trial's downstream runs); `parent_tags` go on the sweep's MLflow run (a study nests it under its own).
    """
    from ray import tune

    callbacks_given = list(callbacks or [])
    sweep = with_absolute_paths(resolve(sweep))  # resolve validates base, resources, scheduler and the space
    base = trial_base(sweep)
    sweep_dir = storage.join(sweep.storage_path, sweep.name)
    train_storage = storage.join(sweep_dir, TRAIN_DIR)
    started = tune.Tuner.can_restore(sweep_dir)  # Tune saved its state: trials may have run
    if resume and not started:
        raise SweepFailed(f"--resume: no sweep state at {sweep_dir} (it never got to its first trial?); "
                          "start it again without --resume")
    if not resume and started:
        raise SweepFailed(f"sweep {sweep.name!r} already exists at {sweep_dir}; continue it with "
                          f"`mocoray sweep --resume {sweep_dir}` or choose another name (--set name=...)")
    storage.makedirs(sweep_dir)
    if not resume:
        storage.write_bytes(storage.join(sweep_dir, SWEEP_FILE), dump_sweep(sweep).encode())

    template = base.model_dump(mode="json")
    template["run"]["storage_path"] = train_storage

    init_ray(address)
    console.run_started(sweep_dir)
    max_concurrent = concurrency(sweep, base)

    uri = parent_id = None
    if base.tracking.enabled:
        uri = base.tracking.tracking_uri
        parent_id = safely("start of the sweep run", start_run, uri, base.tracking.experiment, sweep.name,
                           _parent_params(sweep, max_concurrent),
                           {JOB_TAG: "sweep", "mocoray.sweep_dir": sweep_dir, SOURCE_NAME_TAG: source_name("sweep"), **(parent_tags or {})},
                           run_key=sweep_dir)
        if not resume:
            record_job_start(uri, parent_id, dump_sweep(sweep), lambda: dataset_records(base.data, pretraining=True),
                             environment_record())

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, template=template, sweep_name=sweep.name, parent_run_id=parent_id,
                             command=command_argv(), console_sink=console.sweep_sink(sweep_dir),
                             source=source_name("sweep")),
        {"cpu": sweep.resources.trial_cpus},
    )
    print(f"[mocoray] sweep {sweep.name!r} in {sweep_dir}: {len(sweep.space)} field(s), "
          f"{sweep.num_samples} sample(s), {sweep.scheduler.type} scheduler, up to {max_concurrent} trial(s) at once"
          + (f"; MLflow run {parent_id} at {uri}" if parent_id else ""))
    if resume:
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True,
                                   resume_errored=retry_errored)
    else:
        callbacks = [_early_stop_marker(uri, base.tracking.experiment, train_storage, sweep.name,
                                        base.optim.epochs, parent_id)] if uri else []
        callbacks += callbacks_given
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, scheduler=build_scheduler(sweep),
                num_samples=sweep.num_samples, max_concurrent_trials=max_concurrent,
                trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname,
            ),
            # Tune's own status tables only with --verbose: the trials' lines and the final table say it all
            run_config=tune.RunConfig(name=sweep.name, storage_path=sweep.storage_path, callbacks=callbacks,
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      verbose=None if console.log_to_driver() else 0),
        )
    with interrupts.tune_stops_on_signal() as stopped:
        results = tuner.fit()
    console.flush()

    if stopped.is_set() or len(results) > results.num_terminated + results.num_errors:
        if parent_id:
            safely("end of the sweep run", end_run, uri, parent_id, "KILLED", {STATUS_TAG: "interrupted"})
        print(f"[mocoray] sweep interrupted; continue it with: mocoray sweep --resume {sweep_dir}")
        return SweepResult(sweep_dir, [], None, None, parent_id, uri, interrupted=True)
    return _finish(sweep, base, results, sweep_dir, train_storage, uri, parent_id)


def _close_children(rows: list[dict[str, Any]], uri: str, experiment: str, parent_id: str | None = None) -> None:
    """End every trial's child run with the status the table gives it; record its run id in the row."""
    for row in rows:
        if row["status"] == "early_stopped":
            status, tags, only_running = "KILLED", _early_stop_tags(row["epochs"], row["planned_epochs"]), False
        elif row["status"] == "completed":  # normally closed by its own trial; not if Tune cut its epilogue
            status, tags, only_running = "FINISHED", {STATUS_TAG: "completed"}, True
        else:
            status, tags, only_running = "FAILED", {STATUS_TAG: row["status"]}, True
        row["mlflow_run_id"] = safely("closing a trial run", _close_child, uri, experiment, row["run_dir"],
                                      status, tags, only_if_running=only_running, parent_id=parent_id,
                                      trial_id=row.get("trial_id"))
        if row["status"] == "completed" and row["mlflow_run_id"]:
            safely("tagging the trial's checkpoint", tag_final_checkpoint, uri, row["mlflow_run_id"], row["run_dir"])


def _log_parent(uri: str, parent_id: str, rows: list[dict[str, Any]], best: dict[str, Any] | None,
                sweep: SweepConfig, files: list[tuple[Path, str | None]]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    c = client(uri)
    col = f"best_{sweep.metric}"
    metrics = {f"trials_{s}": sum(r["status"] == s for r in rows) for s in ("completed", "early_stopped", "error")}
    params, tags = [], []
    if best is not None:
        metrics[col] = best[col]
        params = [Param(f"best.{k}", param_value(best[k])) for k in sweep.space]
        tags = [RunTag("mocoray.best_trial_id", best["trial_id"])]
        if best.get("mlflow_run_id"):
            tags.append(RunTag("mocoray.best_run_id", best["mlflow_run_id"]))
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    safely("log of the sweep's summary", c.log_batch, parent_id, metrics=items, params=params, tags=tags)
    for path, folder in files:
        safely(f"log_artifact {path.name}", c.log_artifact, parent_id, str(path), folder)
    for row in rows:  # a trial Tune stopped early never wrote its own final description
        update_description(uri, row.get("mlflow_run_id"))
    update_description(uri, parent_id)  # with the ranking table of its trials
    safely("end of the sweep run", end_run, uri, parent_id, "FINISHED", {STATUS_TAG: "completed"})


def _finish(sweep: SweepConfig, base: PretrainConfig, results, sweep_dir: str, train_storage: str,
            uri: str | None, parent_id: str | None) -> SweepResult:
    """Table, child-run status, best config, plots, and the parent run's summary."""
    import pandas as pd

    rows = trial_rows(results, sweep, base, train_storage)
    for row in rows:
        row["mlflow_run_id"] = None
    if uri:
        _close_children(rows, uri, base.tracking.experiment, parent_id)
    print(f"\n{trial_table(rows, sweep)}")
    remote = "://" in sweep_dir
    out = Path(tempfile.mkdtemp(prefix="mocoray-sweep-")) if remote else Path(sweep_dir)  # staged, then copied
    pd.DataFrame(rows).to_csv(out / TRIALS_CSV, index=False)
    files: list[tuple[Path, str | None]] = [(out / TRIALS_CSV, None)]
    best = pick_best(rows, sweep)
    best_path = storage.join(sweep_dir, BEST_CONFIG) if best is not None else None
    col = f"best_{sweep.metric}"
    if best is not None:
        header = (f"# Best trial {best['trial_id']} of sweep {sweep.name!r}: {col}={best[col]:.4f} "
                  f"({best['epochs']} epochs).\n# Run it with: mocoray pretrain {best_path}\n")
        (out / BEST_CONFIG).write_text(header + dump_yaml(best_config(sweep, best)))
        files.append((out / BEST_CONFIG, None))
        print(f"best trial {best['trial_id']}: {col}={best[col]:.4f} with "
              + ", ".join(f"{k}={best[k]}" for k in sweep.space) + f"\nbest config: {best_path}")
    plots = make_plots(rows, sweep, out / PLOTS_DIR)
    files += [(p, PLOTS_DIR) for p in plots]
    if remote:
        fs, path = fsspec.core.url_to_fs(sweep_dir)
        fs.put(str(out) + "/", path, recursive=True)
    if parent_id:
        _log_parent(uri, parent_id, rows, best, sweep, files)  # type: ignore[arg-type]
    if remote:
        shutil.rmtree(out)
    plot_paths = [storage.join(sweep_dir, f"{PLOTS_DIR}/{p.name}") for p in plots]
    return SweepResult(sweep_dir, rows, best, best_path, parent_id, uri, plot_paths)
