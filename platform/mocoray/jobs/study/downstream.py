"""A study's downstream runs: each chosen trial's linear / detection run as a Ray task, launched as soon as
the trial finishes (a Tune callback) or after the sweep (top N), at most as many at once as fit, each outcome
recorded in the study's state file and in MLflow, and none run twice (MLflow is asked before each launch).
"""


from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import yaml

from ... import storage
from ...config import load_detect_config, load_linear_config
from ...config.study import StudyConfig, TrialSelection
from ...tracking.artifacts import command_argv, set_command_line
from ...tracking.client import (
    JOB_TAG,
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
from ...tracking.describe import set_recipes
from ...tracking.transfer import ERROR_TAG, KIND_JOBS
from .. import console
from ..runtime import run_dir_of
from ..sweep.driver import tag_final_checkpoint
from ..sweep.report import trial_run_name

STATE_FILE = "state.json"


DOWNSTREAM_DIR = "downstream"


SUFFIX = {"linear": "linear", "detection": "detect"}  # downstream run name: <trial run name>-<suffix>


@dataclass
class DownstreamFault:
    """Tests only: these extra overrides for one evaluation (`kind`) of the trial numbered `trial_number`
    (Tune's trial id ends in it: `..._00002`), e.g. a dataset path that does not exist."""

    trial_number: int
    kind: str
    overrides: list[str]


def _downstream_job(kind: str, recipe: str, overrides: list[str], values: dict[str, Any],
                    command: list[str], console_sink: dict | None = None, prefix: str = "") -> dict[str, Any]:
    """One downstream run, inside a Ray task: load its config, run it (resumed when its folder exists: an
    interrupted study left it), return its outcome. Any failure is returned, not raised: the study goes on.
    Its lines reach the study's terminal through `console_sink`, after `prefix`."""
    from ..detect.driver import run_detection
    from ..linear.driver import run_linear_eval

    set_command_line(command)
    console.adopt(console_sink, prefix)
    set_recipes(**{kind: recipe})  # this task's process: its run's Source names the recipe
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
        safely("tagging the trial's checkpoint", tag_final_checkpoint, self.uri, trial["trial_run_id"],
               trial["run_dir"])
        spec = getattr(self.study, kind)
        number = int(trial["trial_id"].rsplit("_", 1)[-1])
        extra = [o for f in self.faults if f.kind == kind and f.trial_number == number for o in f.overrides]
        values = {"encoder.pretrain_run": trial["trial_run_id"], "tracking.tracking_uri": self.uri,
                  "run.name": self._run_name(trial, kind),
                  "run.storage_path": storage.join(self.study_dir, DOWNSTREAM_DIR)}
        task = ray.remote(_downstream_job).options(num_cpus=self.study.downstream.driver_cpus,
                                                   name=f"{kind}:{values['run.name']}", max_retries=0)
        ref = task.remote(kind, spec.recipe, [*spec.overrides, *extra], values, command_argv(),
                          console.sweep_sink(self.study_dir), f"[trial {trial['trial_id']} {kind}] ")
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
            from mocoray.jobs.study.downstream import active_scheduler

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
            from mocoray.jobs.study.downstream import active_scheduler

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
