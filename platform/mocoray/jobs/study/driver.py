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
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ... import storage
from ...checkpoints import newest_complete_checkpoint
from ...config import ConfigError, dump_yaml, flatten, load_detect_config, load_linear_config
from ...config.study import StudyConfig, TrialSelection, dump_study
from ...config.sweep import resolve, trial_base
from ...tracking.artifacts import command_argv, environment_record, record_job_start, set_command_line
from ...tracking.client import (
    CHECKPOINT_TAG,
    JOB_TAG,
    MLFLOW_PARENT_TAG,
    PRETRAIN_RUN_TAG,
    RUN_DIR_TAG,
    STATUS_TAG,
    client,
    end_run,
    experiment_id,
    find_run,
    safely,
    start_run,
)
from ...tracking.transfer import ERROR_TAG, KIND_JOBS, STUDY_SWEEP_TAG, transfer_rows
from ..runtime import init_ray, run_dir_of
from ..sweep.driver import TRIALS_CSV, run_sweep, with_absolute_paths
from ..sweep.report import best_config, trial_run_name
from . import analysis

STUDY_FILE = "study.yaml"
STATE_FILE = "state.json"
TRANSFER_CSV = "transfer.csv"
SUMMARY = "summary.md"
PLOTS_DIR = "plots"
DOWNSTREAM_DIR = "downstream"
STUDY_RUN_TAG = "mocoray.study_run_id"  # on the sweep's run: the study above it
SUFFIX = {"linear": "linear", "detection": "detect"}  # downstream run name: <trial run name>-<suffix>


class StudyFailed(RuntimeError):
    """The study could not start or continue (it exists already, nothing to resume, ...)."""


@dataclass
class DownstreamFault:
    """Tests only: these extra overrides for one evaluation (`kind`) of the trial numbered `trial_number`
    (Tune's trial id ends in it: `..._00002`), e.g. a dataset path that does not exist."""

    trial_number: int
    kind: str
    overrides: list[str]


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


def _downstream_job(kind: str, recipe: str, overrides: list[str], values: dict[str, Any],
                    command: list[str]) -> dict[str, Any]:
    """One downstream run, inside a Ray task: load its config, run it (resumed when its folder exists: an
    interrupted study left it), return its outcome. Any failure is returned, not raised: the study goes on."""
    from ..detect.driver import run_detection
    from ..linear.driver import run_linear_eval

    set_command_line(command)
    try:
        if kind == "linear":
            cfg = load_linear_config(recipe, overrides, values)
            res = run_linear_eval(cfg, resume=storage.exists(run_dir_of(cfg.run)))
        else:
            cfg = load_detect_config(recipe, overrides, values)
            res = run_detection(cfg, resume=storage.exists(run_dir_of(cfg.run)))
    except Exception as err:  # noqa: BLE001  whatever stopped it is the record
        return {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    return {"status": "finished", "run_id": res.mlflow_run_id}


class Downstream:
    """Launches downstream runs as Ray tasks, at most `max_concurrent` at once, and records their outcomes."""

    def __init__(self, study: StudyConfig, study_dir: str, uri: str, experiment: str,
                 faults: list[DownstreamFault]) -> None:
        self.study, self.study_dir, self.uri, self.experiment = study, study_dir, uri, experiment
        self.faults = faults
        self.queue: deque[tuple[dict[str, Any], str]] = deque()
        self.running: dict[Any, tuple[dict[str, Any], str, str]] = {}
        self.offered: set[tuple[str, str]] = set()
        self.records: dict[str, dict[str, Any]] = {}
        self.max_concurrent = study.downstream.max_concurrent or self._fits()

    def _fits(self) -> int:
        """Downstream runs the cluster fits at once (driver task + workers), at least one."""
        import ray

        need = 0.0
        for kind in self.study.kinds:
            spec = getattr(self.study, kind)
            load = load_linear_config if kind == "linear" else load_detect_config
            run = load(spec.recipe, spec.overrides, {"encoder.random_init": True, "encoder.arch": "small_resnet"}).run
            need = max(need, self.study.downstream.driver_cpus + run.num_workers * run.cpus_per_worker)
        return max(1, int(ray.cluster_resources().get("CPU", 0.0) // need))

    def offer(self, trial: dict[str, Any]) -> None:
        """Queue the evaluations of `trial` (trial_id, trial_run_id, run_name, run_dir) not offered before."""
        for kind in self.study.kinds:
            if (trial["trial_id"], kind) not in self.offered:
                self.offered.add((trial["trial_id"], kind))
                self.queue.append((trial, kind))
        self.pump()

    def pump(self) -> None:
        """Collect finished tasks; launch queued runs while there is room."""
        import ray

        if self.running:
            ready, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=0)
            for ref in ready:
                self._collect(ref)
        while self.queue and len(self.running) < self.max_concurrent:
            self._launch(*self.queue.popleft())

    def wait(self) -> None:
        import ray

        self.pump()
        while self.running or self.queue:
            ray.wait(list(self.running), num_returns=1, timeout=5.0)
            self.pump()

    def _run_name(self, trial: dict[str, Any], kind: str) -> str:
        return f"{trial['run_name']}-{SUFFIX[kind]}"

    def _launch(self, trial: dict[str, Any], kind: str) -> None:
        import ray

        key = f"{trial['trial_id']}/{kind}"
        done = _finished_run(self.uri, trial["trial_run_id"], kind)
        if done:  # an earlier attempt of the study finished it
            self.records[key] = {"status": "finished", "run_id": done}
            self._save()
            return
        safely("tagging the trial's checkpoint", _tag_final_checkpoint, self.uri, trial)
        spec = getattr(self.study, kind)
        number = int(trial["trial_id"].rsplit("_", 1)[-1])
        extra = [o for f in self.faults if f.kind == kind and f.trial_number == number for o in f.overrides]
        values = {"encoder.pretrain_run": trial["trial_run_id"], "tracking.tracking_uri": self.uri,
                  "run.name": self._run_name(trial, kind),
                  "run.storage_path": storage.join(self.study_dir, DOWNSTREAM_DIR)}
        task = ray.remote(_downstream_job).options(num_cpus=self.study.downstream.driver_cpus,
                                                   name=f"{kind}:{values['run.name']}", max_retries=0)
        ref = task.remote(kind, spec.recipe, [*spec.overrides, *extra], values, command_argv())
        self.running[ref] = (trial, kind, key)
        print(f"[mocoray] study: {kind} of trial {trial['trial_id']} started")

    def _collect(self, ref) -> None:
        import ray

        trial, kind, key = self.running.pop(ref)
        try:
            outcome = ray.get(ref)
        except Exception as err:  # noqa: BLE001  the task itself died (its worker crashed, a node was lost)
            outcome = {"status": "failed", "error": f"{type(err).__name__}: {str(err).splitlines()[0][:500]}"}
        if outcome["status"] == "failed":
            outcome["run_id"] = safely("recording a failed downstream run", self._record_failure, trial, kind,
                                       outcome["error"])
            print(f"[mocoray] study: {kind} of trial {trial['trial_id']} FAILED: {outcome['error'][:300]}")
        else:
            print(f"[mocoray] study: {kind} of trial {trial['trial_id']} finished")
        self.records[key] = outcome
        self._save()

    def _record_failure(self, trial: dict[str, Any], kind: str, error: str) -> str:
        """The failed run's MLflow run marked FAILED with its error; one made when it failed before opening one."""
        c = client(self.uri)
        run_dir = storage.join(storage.join(self.study_dir, DOWNSTREAM_DIR), self._run_name(trial, kind))
        exp_ids = [e.experiment_id for e in c.search_experiments()]
        runs = c.search_runs(exp_ids, f"tags.`{RUN_DIR_TAG}` = '{run_dir}'", max_results=1,
                             order_by=["attributes.start_time DESC"])
        if runs:
            run_id = runs[0].info.run_id
        else:
            run_id = start_run(self.uri, self.experiment, self._run_name(trial, kind), {},
                               {JOB_TAG: KIND_JOBS[kind], PRETRAIN_RUN_TAG: trial["trial_run_id"],
                                RUN_DIR_TAG: run_dir}, run_key=run_dir)
        end_run(self.uri, run_id, "FAILED", {STATUS_TAG: "failed", ERROR_TAG: error[:5000]})
        return run_id

    def _save(self) -> None:
        storage.write_bytes(storage.join(self.study_dir, STATE_FILE),
                            yaml.safe_dump({"downstream": self.records}, sort_keys=True).encode())


def _finished_run(uri: str, trial_run_id: str, kind: str) -> str | None:
    """Id of a FINISHED downstream run of this kind on this trial's run, if there is one."""
    c = client(uri)
    exp_ids = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(exp_ids, f"tags.`{JOB_TAG}` = '{KIND_JOBS[kind]}' and tags.`{PRETRAIN_RUN_TAG}` = "
                                  f"'{trial_run_id}' and attributes.status = 'FINISHED'", max_results=1)
    return runs[0].info.run_id if runs else None


def _tag_final_checkpoint(uri: str, trial: dict[str, Any]) -> None:
    """A trial that Tune stopped at its last epoch (ASHA at max_t) did not run its own epilogue, which tags
    its run with its final checkpoint (what the downstream runs load): tag it with the newest complete
    checkpoint in its folder, as the epilogue would have."""
    c = client(uri)
    if CHECKPOINT_TAG in c.get_run(trial["trial_run_id"]).data.tags:
        return
    newest = newest_complete_checkpoint(trial["run_dir"])
    if newest:
        c.set_tag(trial["trial_run_id"], CHECKPOINT_TAG, newest)


_ACTIVE: dict[str, Downstream] = {}  # study folder -> its live scheduler


def active_scheduler(study_dir: str) -> Downstream | None:
    """The scheduler of the study running in this process from `study_dir` (None: none is)."""
    return _ACTIVE.get(study_dir)


def _trial_callback(study_dir: str, uri: str, experiment: str, train_storage: str, sweep_name: str, epochs: int,
                    include_early_stopped: bool):
    """A Tune callback: each trial that finishes (ran its epochs, or any with `include_early_stopped`) is
    offered to the study's scheduler at once; every step of Tune's loop lets the scheduler launch more.
    The scheduler is looked up by import at call time: Tune keeps a pickled copy of its callbacks (what a
    restored sweep gets), and a copy must find the live scheduler, not a copy of an empty registry."""
    from ray import tune

    class TrialFinished(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
            from mocoray.jobs.study.driver import active_scheduler

            scheduler = active_scheduler(study_dir)
            planned = int(trial.config.get("optim.epochs", epochs))
            done = int((trial.last_result or {}).get("epoch", 0))
            if scheduler is None or done == 0 or (done < planned and not include_early_stopped):
                return
            name = trial_run_name(sweep_name, trial.trial_id)
            c = client(uri)
            run_id = find_run(c, experiment_id(c, experiment), f"{train_storage}/{name}")
            if run_id:
                scheduler.offer({"trial_id": trial.trial_id, "trial_run_id": run_id, "run_name": name,
                                 "run_dir": f"{train_storage}/{name}"})

        def on_step_end(self, iteration: int, trials: list, **info) -> None:
            from mocoray.jobs.study.driver import active_scheduler

            scheduler = active_scheduler(study_dir)
            if scheduler is not None:
                scheduler.pump()

    return TrialFinished()


def choose_trials(rows: list[dict[str, Any]], study: StudyConfig, metric: str, mode: str) -> list[dict[str, Any]]:
    """The trials that get downstream runs: all eligible ones, or the top N by the sweep metric plus M drawn
    at random (with the seed) from the other eligible ones. Eligible: completed (or early-stopped too, with
    include_early_stopped), with an MLflow run."""
    import random

    statuses = ("completed", "early_stopped") if study.include_early_stopped else ("completed",)
    eligible = [r for r in rows if r["status"] in statuses and r.get("mlflow_run_id")]
    if not isinstance(study.trials, TrialSelection):
        return eligible
    col = f"best_{metric}"
    sign = 1.0 if mode == "max" else -1.0
    ranked = sorted((r for r in eligible if r.get(col) is not None), key=lambda r: -sign * r[col])
    top, rest = ranked[: study.trials.top], ranked[study.trials.top :]
    rest.sort(key=lambda r: r["trial_id"])
    drawn = random.Random(study.trials.seed).sample(rest, min(study.trials.random, len(rest)))
    return top + drawn


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
    run_id = start_run(uri, experiment, study.name, _study_params(study, sweep.metric, sweep.mode),
                       {JOB_TAG: "study", "mocoray.study_dir": study_dir,
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
           {STATUS_TAG: "completed" if not failed else f"completed, {failed} downstream run(s) failed"})
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
    from ...config import build

    url = storage.join(storage.absolute(str(path)), STUDY_FILE)
    if not storage.exists(url) or storage.is_dir(url):
        raise StudyFailed(f"--resume: {path} is not a study folder (no {STUDY_FILE}); pass the folder printed "
                          "when the study started: <storage_path>/<name>")
    study = build(StudyConfig, yaml.safe_load(storage.read_bytes(url)))
    storage_path, name = url.rsplit("/", 2)[:2]
    if name != study.name:
        raise ConfigError(f"--resume: the folder {path} is named {name!r} but holds study {study.name!r}")
    return study.model_copy(update={"storage_path": storage_path})
