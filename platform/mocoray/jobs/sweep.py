"""Ray Tune sweeps over pretraining fields (K, m, tau first): `run_sweep` (driver) and `run_trial` (a trial).

Ray 2.60 / Train V2 pattern: each Tune trial is a function that builds and fits its own TorchTrainer
(`run_pretrain`), with `TuneReportCallback` forwarding every epoch's report to Tune, so every trial
is a distributed Ray Train run and ASHA judges trials by epoch.

The sweep's folder <storage_path>/<name> is Tune's experiment folder; beside Tune's files it holds
`sweep.yaml` (the resolved sweep, what `--resume` reads), `train/<name>-<trial_id>` (each trial's
Ray Train run: deterministic, so a restarted trial continues its own run), `trials.csv`,
`best_config.yaml` and `plots/`. MLflow: one parent run (mocoray.job=sweep) and one child run per
trial (mocoray.job=pretrain, the sweep's run id, `mlflow.parentRunId`).
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from ..config import PretrainConfig, build, dump_yaml, set_dotted
from ..sweep_config import SweepConfig, dump_sweep, is_int_field, max_epochs, resolve, trial_base
from ..tracking import (
    JOB_TAG,
    STATUS_TAG,
    SWEEP_RUN_TAG,
    client,
    end_run,
    experiment_id,
    find_run,
    param_value,
    resolve_tracking_uri,
    start_run,
)
from .common import absolute_storage, init_ray
from .pretrain import run_pretrain

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.yaml"
TRIALS_CSV = "trials.csv"
BEST_CONFIG = "best_config.yaml"
PLOTS_DIR = "plots"
TRAIN_DIR = "train"
TRIAL_TAG = "mocoray.trial_id"
MLFLOW_PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: nests children under the parent in the UI


class SweepFailed(RuntimeError):
    """The sweep could not start or continue (bad state on disk, nothing to resume, ...)."""


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """run.name of a trial's Ray Train run: deterministic, so a restarted trial resumes its own run."""
    return f"{sweep_name}-{trial_id}"


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _plain(value: Any) -> Any:
    """numpy scalars from Tune's samplers -> Python values (pydantic and YAML want those)."""
    import numpy as np

    return value.item() if isinstance(value, np.generic) else value


def tune_space(sweep: SweepConfig) -> dict[str, Any]:
    """The Tune param_space: dotted field name -> Tune domain."""
    space: dict[str, Any] = {}
    for key, spec in sweep.space.items():
        if spec.kind == "grid":
            space[key] = tune.grid_search(spec.values)
        elif spec.kind == "choice":
            space[key] = tune.choice(spec.values)
        else:
            low, high = spec.bounds
            if spec.kind == "randint" or is_int_field(key):  # integer field: integer samples, high included
                sampler = tune.lograndint if spec.kind == "loguniform" else tune.randint
                space[key] = sampler(int(low), int(high) + 1)
            else:
                space[key] = (tune.loguniform if spec.kind == "loguniform" else tune.uniform)(low, high)
    return space


def run_trial(config: dict[str, Any], template: dict[str, Any], sweep_name: str, parent_run_id: str | None) -> None:
    """One Tune trial: the template config + this trial's values -> a full pretraining run on Ray Train."""
    trial_id = tune.get_context().get_trial_id()
    data = copy.deepcopy(template)
    for key, value in config.items():
        set_dotted(data, key, _plain(value))
    data["run"]["name"] = trial_run_name(sweep_name, trial_id)
    cfg = build(PretrainConfig, data)
    tags = {TRIAL_TAG: trial_id}
    if parent_run_id:
        tags.update({SWEEP_RUN_TAG: parent_run_id, MLFLOW_PARENT_TAG: parent_run_id})
    run_pretrain(cfg, resume="auto", extra_tags=tags, callbacks=[TuneReportCallback()])


def _close_child(uri: str, experiment: str, run_key: str, status: str, tags: dict[str, str],
                 only_if_running: bool = False) -> str | None:
    """End a trial's MLflow run (found by its run key); returns its id, or None if it has none."""
    c = client(uri)
    run_id = find_run(c, experiment_id(c, experiment), run_key)
    if run_id and (not only_if_running or c.get_run(run_id).info.status == "RUNNING"):
        end_run(uri, run_id, status, tags)
    return run_id


def _early_stop_tags(epochs_run: int, epochs: int) -> dict[str, str]:
    return {STATUS_TAG: "early_stopped", "mocoray.epochs_run": str(epochs_run), "mocoray.epochs_planned": str(epochs)}


class EarlyStopMarker(tune.Callback):
    """Driver side: when Tune stops a trial early, its child run is ended KILLED and tagged early_stopped.

    Tune tears the trial's process (and so its TorchTrainer) down, so the trial cannot end its run itself.
    """

    def __init__(self, uri: str, experiment: str, train_storage: str, sweep_name: str, epochs: int) -> None:
        self.uri, self.experiment, self.train_storage = uri, experiment, train_storage
        self.sweep_name, self.epochs = sweep_name, epochs

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        planned = int(trial.config.get("optim.epochs", self.epochs))
        done = int((trial.last_result or {}).get("epoch", 0))
        if done >= planned:
            return
        run_key = f"{self.train_storage}/{trial_run_name(self.sweep_name, trial.trial_id)}"
        try:
            _close_child(self.uri, self.experiment, run_key, "KILLED", _early_stop_tags(done, planned))
        except Exception as err:  # tracking must not stop the sweep
            log.warning("could not mark trial %s early-stopped in MLflow: %s", trial.trial_id, err)


def _build_scheduler(sweep: SweepConfig):
    s = sweep.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    # time_attr=epoch (not training_iteration): a restarted trial continues at its own epoch.
    # stop_last_trials=False: a trial that reaches max_t finishes on its own (run closed, backbone exported).
    return ASHAScheduler(time_attr="epoch", max_t=s.max_t or max_epochs(sweep), grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, stop_last_trials=False)


def _space_values(sweep: SweepConfig, field: str) -> list[Any]:
    """Grid/choice values or the two range ends of a searched field; [] when it is not searched."""
    spec = sweep.space.get(field)
    return spec.values if spec is not None else []


def _largest(sweep: SweepConfig, field: str, base_value: float) -> float:
    return max([base_value, *_space_values(sweep, field)])


def _concurrency(sweep: SweepConfig, base: PretrainConfig) -> int:
    """Trials at once: what the user asked for, else as many as the cluster fits (driver + workers each).

    Tune only reserves each trial's driver; the workers' placement group comes later from Ray Train.
    Letting Tune start more trials than fit would park every trial's workers forever. A searched
    run.num_workers / cpus_per_worker / gpus_per_worker counts at its largest value, so the biggest
    trial fits alongside the others.
    """
    run = base.run
    workers = _largest(sweep, "run.num_workers", run.num_workers)
    per_cpu = sweep.resources.trial_cpus + workers * _largest(sweep, "run.cpus_per_worker", run.cpus_per_worker)
    uses_gpu = run.use_gpu or any(bool(v) for v in _space_values(sweep, "run.use_gpu"))
    per_gpu = workers * _largest(sweep, "run.gpus_per_worker", run.gpus_per_worker) if uses_gpu else 0.0
    total = ray.cluster_resources()
    fits = math.floor(total.get("CPU", 0.0) / per_cpu + 1e-9)
    if per_gpu:
        fits = min(fits, math.floor(total.get("GPU", 0.0) / per_gpu + 1e-9))
    need = f"{per_cpu:g} CPU" + (f" + {per_gpu:g} GPU" if per_gpu else "")
    if fits < 1:
        print(f"[mocoray] warning: one trial needs {need} (resources.trial_cpus + workers); the cluster has "
              f"{total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU: trials will wait for more nodes")
        fits = 1
    if sweep.max_concurrent_trials is None:
        return fits
    if sweep.max_concurrent_trials > fits:
        print(f"[mocoray] warning: max_concurrent_trials={sweep.max_concurrent_trials} but only {fits} trial(s) "
              f"of {need} fit the cluster now; the others' workers will wait")
    return sweep.max_concurrent_trials


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


def _trial_rows(results, sweep: SweepConfig, base: PretrainConfig, train_storage: str) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        trial_id = Path(r.path).name.removeprefix("trial_")
        df = r.metrics_dataframe
        has = df is not None and not df.empty and sweep.metric in df
        values = df[sweep.metric].dropna() if has else None
        best = None
        if values is not None and len(values):
            best = float(values.max() if sweep.mode == "max" else values.min())
        epochs_run = int(df["epoch"].max()) if has and "epoch" in df else 0
        planned = int(_plain(r.config.get("optim.epochs", base.optim.epochs)))
        if r.error is not None:
            status = "error"
        elif epochs_run >= planned:
            status = "completed"
        elif epochs_run == 0:
            status = "not_started"
        else:
            status = "early_stopped"
        row = {"trial_id": trial_id}
        row.update({key: _plain(r.config.get(key)) for key in sweep.space})
        row.update({f"best_{sweep.metric}": best, "epochs": epochs_run, "planned_epochs": planned,
                    "status": status, "run_dir": f"{train_storage}/{trial_run_name(sweep.name, trial_id)}"})
        rows.append(row)
    return sorted(rows, key=lambda row: row["trial_id"])


def _pick_best(rows: list[dict[str, Any]], sweep: SweepConfig) -> dict[str, Any] | None:
    """Best metric among completed trials (early-stopped ones only if none completed)."""
    col = f"best_{sweep.metric}"
    scored = [r for r in rows if r[col] is not None and r["status"] == "completed"]
    scored = scored or [r for r in rows if r[col] is not None and r["status"] != "error"]
    if not scored:
        return None
    sign = 1.0 if sweep.mode == "max" else -1.0
    return max(scored, key=lambda r: sign * r[col])


def best_config(sweep: SweepConfig, best: dict[str, Any]) -> PretrainConfig:
    """The best trial's full recipe, renamed to a fresh run in the base recipe's storage."""
    assert isinstance(sweep.base, dict)
    data = trial_base(sweep).model_dump(mode="json")
    for key in sweep.space:
        set_dotted(data, key, best[key])
    data["run"]["name"] = f"{sweep.name}-best"
    data["run"]["storage_path"] = sweep.base["run"]["storage_path"]
    return build(PretrainConfig, data)


def _format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    table = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)) for t in table]
    return "\n".join(lines)


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _log_axis(sweep: SweepConfig, key: str, values: list[Any]) -> bool:
    spec = sweep.space[key]
    if spec.kind == "loguniform":
        return True
    positive = _numeric(values) and values and min(values) > 0
    return bool(positive and max(values) / min(values) >= 20)


def make_plots(rows: list[dict[str, Any]], sweep: SweepConfig, out_dir: Path) -> list[Path]:
    """PNG per searched field (best metric vs the field's value) and a heatmap when the space has 2 grids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    col = f"best_{sweep.metric}"
    scored = [r for r in rows if r[col] is not None]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if not scored:
        return paths
    styles = {"completed": ("o", "tab:blue"), "early_stopped": ("x", "tab:orange")}
    for key in sweep.space:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        values = [r[key] for r in scored]
        numeric = _numeric(values)
        categories = sorted({str(v) for v in values})
        for status, (marker, color) in styles.items():
            pts = [r for r in scored if r["status"] == status]
            if pts:
                xs = [r[key] if numeric else categories.index(str(r[key])) for r in pts]
                ax.scatter(xs, [r[col] for r in pts], marker=marker, color=color, label=status.replace("_", " "))
        if numeric and _log_axis(sweep, key, values):
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        if not numeric:
            ax.set_xticks(range(len(categories)), categories)
        ax.set_xlabel(key)
        ax.set_ylabel(col)
        ax.set_title(f"{sweep.name}: {col} vs {key}")
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"{sweep.metric}_vs_{key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    grids = [k for k, spec in sweep.space.items() if spec.kind == "grid"]
    if len(grids) == 2:
        a, b = grids
        xs, ys = sweep.space[a].values, sweep.space[b].values
        cells = np.full((len(ys), len(xs)), np.nan)
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                hits = [r[col] for r in scored if r[a] == x and r[b] == y]
                if hits:
                    cells[i, j] = float(np.mean(hits))
        fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 2.5, 0.8 * len(ys) + 2))
        im = ax.imshow(cells, origin="lower", cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_yticks(range(len(ys)), [str(y) for y in ys])
        for i in range(len(ys)):
            for j in range(len(xs)):
                if not np.isnan(cells[i, j]):
                    ax.text(j, i, f"{cells[i, j]:.3f}", ha="center", va="center", color="w", fontsize="small")
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        ax.set_title(f"mean {col}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = out_dir / f"heatmap_{a}_{b}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _parent_params(sweep: SweepConfig, max_concurrent: int) -> dict[str, Any]:
    params: dict[str, Any] = {f"space.{k}": spec.describe() for k, spec in sweep.space.items()}
    params.update({f"scheduler.{k}": v for k, v in sweep.scheduler.model_dump().items()})
    if sweep.scheduler.type == "asha":
        params["scheduler.max_t"] = sweep.scheduler.max_t or max_epochs(sweep)
    params.update({f"resources.{k}": v for k, v in sweep.resources.model_dump().items()})
    params.update({"num_samples": sweep.num_samples, "metric": sweep.metric, "mode": sweep.mode,
                   "max_concurrent_trials": max_concurrent})
    return params


def _safe(what: str, fn, *args, **kwargs) -> Any:
    """Tracking calls of the driver: a tracking outage is reported, the sweep goes on."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        log.warning("MLflow %s failed: %s", what, err)
        print(f"[mocoray] warning: MLflow {what} failed: {str(err).splitlines()[0][:200]}")
        return None


def load_sweep_dir(path: str) -> SweepConfig:
    """The resolved sweep saved in a sweep folder, local or URL (what `--resume <folder>` continues)."""
    url = absolute_storage(str(path)).rstrip("/") + "/" + SWEEP_FILE
    fs, file = fsspec.core.url_to_fs(url)
    if not fs.isfile(file):
        raise SweepFailed(f"--resume: {path} is not a sweep folder (no {SWEEP_FILE}); "
                          "pass the folder printed when the sweep started: <storage_path>/<name>")
    with fs.open(file) as f:
        sweep = build(SweepConfig, yaml.safe_load(f))
    storage, name = url.rsplit("/", 2)[:2]  # the folder may have moved since: its parent is the storage
    if name != sweep.name:
        raise SweepFailed(f"--resume: the folder {path} is named {name!r} but holds sweep {sweep.name!r}; "
                          "its trials' runs are named after the sweep: rename the folder back")
    return resolve(sweep.model_copy(update={"storage_path": storage}))


def _pinned(sweep: SweepConfig) -> SweepConfig:
    """Storage, data paths and the tracking URI made absolute: a resume from elsewhere finds the same ones."""
    assert isinstance(sweep.base, dict)
    base = copy.deepcopy(sweep.base)
    for key in ("root", "val_root"):
        if base["data"].get(key):
            base["data"][key] = absolute_storage(base["data"][key])  # trials also run in scratch dirs
    tracking = dict(sweep.tracking)
    trial_tracking = trial_base(sweep).tracking
    if trial_tracking.enabled:
        tracking["tracking_uri"] = resolve_tracking_uri(trial_tracking.tracking_uri)
    return sweep.model_copy(update={"base": base, "tracking": tracking,
                                    "storage_path": absolute_storage(sweep.storage_path)})


def run_sweep(
    sweep: SweepConfig,
    address: str | None = None,
    resume: bool = False,
    retry_errored: bool = False,
) -> SweepResult:
    """Run (or with `resume`, continue) a sweep; every check of the space happens before any trial.

    A `base` given as a path is read relative to the working directory. On resume, finished
    trials are kept as they are, unfinished ones continue their own Ray Train runs, errored ones are
    retried only with `retry_errored`.
    """
    sweep = _pinned(resolve(sweep))  # resolve validates the base, resources, scheduler and every space entry
    base = trial_base(sweep)
    storage = sweep.storage_path
    sweep_dir = storage.rstrip("/") + "/" + sweep.name
    train_storage = sweep_dir + "/" + TRAIN_DIR
    started = tune.Tuner.can_restore(sweep_dir)  # Tune saved its state: trials may have run
    if resume and not started:
        raise SweepFailed(f"--resume: no sweep state at {sweep_dir} (it never got to its first trial?); "
                          "start it again without --resume")
    if not resume and started:
        raise SweepFailed(f"sweep {sweep.name!r} already exists at {sweep_dir}; continue it with "
                          f"`mocoray sweep --resume {sweep_dir}` or choose another name (--set name=...)")
    fs, path = fsspec.core.url_to_fs(sweep_dir)
    fs.makedirs(path, exist_ok=True)
    if not resume:
        with fs.open(path + "/" + SWEEP_FILE, "w") as f:
            f.write(dump_sweep(sweep))

    template = base.model_dump(mode="json")
    template["run"]["storage_path"] = train_storage

    init_ray(address)
    max_concurrent = _concurrency(sweep, base)

    uri = parent_id = None
    if base.tracking.enabled:
        uri = base.tracking.tracking_uri
        parent_id = _safe("start of the sweep run", start_run, uri, base.tracking.experiment, sweep.name,
                          _parent_params(sweep, max_concurrent),
                          {JOB_TAG: "sweep", "mocoray.sweep_dir": sweep_dir}, run_key=sweep_dir)
        if parent_id and not resume:
            _log_artifact_text(uri, parent_id, SWEEP_FILE, dump_sweep(sweep))

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, template=template, sweep_name=sweep.name, parent_run_id=parent_id),
        {"cpu": sweep.resources.trial_cpus},
    )
    print(f"[mocoray] sweep {sweep.name!r} in {sweep_dir}: {len(sweep.space)} field(s), "
          f"{sweep.num_samples} sample(s), {sweep.scheduler.type} scheduler, up to {max_concurrent} trial(s) at once"
          + (f"; MLflow run {parent_id} at {uri}" if parent_id else ""))
    if resume:
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True,
                                   resume_errored=retry_errored)
    else:
        callbacks = [EarlyStopMarker(uri, base.tracking.experiment, train_storage, sweep.name,
                                     base.optim.epochs)] if uri else []
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, scheduler=_build_scheduler(sweep),
                num_samples=sweep.num_samples, max_concurrent_trials=max_concurrent,
                trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(name=sweep.name, storage_path=storage, callbacks=callbacks,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    results = tuner.fit()

    if len(results) > results.num_terminated + results.num_errors:
        if parent_id:
            _safe("end of the sweep run", end_run, uri, parent_id, "KILLED", {STATUS_TAG: "interrupted"})
        print(f"[mocoray] sweep interrupted; continue it with: mocoray sweep --resume {sweep_dir}")
        return SweepResult(sweep_dir, [], None, None, parent_id, uri, interrupted=True)
    return _finish(sweep, base, results, sweep_dir, train_storage, uri, parent_id)


def _log_artifact_text(uri: str, run_id: str, name: str, text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        _safe(f"log_artifact {name}", client(uri).log_artifact, run_id, str(path))


def _finish(sweep: SweepConfig, base: PretrainConfig, results, sweep_dir: str, train_storage: str,
            uri: str | None, parent_id: str | None) -> SweepResult:
    """Table, child-run status, best config, plots, and the parent run's summary."""
    import pandas as pd
    from mlflow.entities import Param

    rows = _trial_rows(results, sweep, base, train_storage)
    for row in rows:
        row["mlflow_run_id"] = None
        if not uri:
            continue
        if row["status"] == "early_stopped":
            status, tags, only_running = "KILLED", _early_stop_tags(row["epochs"], row["planned_epochs"]), False
        elif row["status"] == "completed":  # normally closed by its own trial; not if Tune cut its epilogue
            status, tags, only_running = "FINISHED", {STATUS_TAG: "completed"}, True
        else:
            status, tags, only_running = "FAILED", {STATUS_TAG: row["status"]}, True
        row["mlflow_run_id"] = _safe("closing a trial run", _close_child, uri, base.tracking.experiment,
                                     row["run_dir"], status, tags, only_if_running=only_running)

    col = f"best_{sweep.metric}"
    columns = ["trial_id", *sweep.space, col, "epochs", "status"]
    print(f"\n{_format_table(rows, columns)}\n")
    remote = "://" in sweep_dir
    out = Path(tempfile.mkdtemp(prefix="mocoray-sweep-")) if remote else Path(sweep_dir)  # staged, then copied
    pd.DataFrame(rows).to_csv(out / TRIALS_CSV, index=False)
    best = _pick_best(rows, sweep)
    best_path = f"{sweep_dir}/{BEST_CONFIG}" if best is not None else None
    if best is not None:
        cfg = best_config(sweep, best)
        header = (f"# Best trial {best['trial_id']} of sweep {sweep.name!r}: {col}={best[col]:.4f} "
                  f"({best['epochs']} epochs).\n# Run it with: mocoray pretrain {best_path}\n")
        (out / BEST_CONFIG).write_text(header + dump_yaml(cfg))
    plots = make_plots(rows, sweep, out / PLOTS_DIR)
    if remote:
        fs, path = fsspec.core.url_to_fs(sweep_dir)
        fs.put(str(out) + "/", path, recursive=True)
    if best is not None:
        print(f"best trial {best['trial_id']}: {col}={best[col]:.4f} with "
              + ", ".join(f"{k}={best[k]}" for k in sweep.space) + f"\nbest config: {best_path}")

    if parent_id:
        c = client(uri)
        counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "early_stopped", "error")}
        metrics = {f"trials_{s}": n for s, n in counts.items()}
        if best is not None:
            metrics[f"best_{sweep.metric}"] = best[col]
            best_params = [Param(f"best.{k}", param_value(best[k])) for k in sweep.space]
            _safe("log of the best config", c.log_batch, parent_id, params=best_params)
            _safe("best-trial tags", c.set_tag, parent_id, "mocoray.best_trial_id", best["trial_id"])
            if best.get("mlflow_run_id"):
                _safe("best-trial tags", c.set_tag, parent_id, "mocoray.best_run_id", best["mlflow_run_id"])
        for k, v in metrics.items():
            _safe("log_metric", c.log_metric, parent_id, k, float(v))
        _safe("log_artifact", c.log_artifact, parent_id, str(out / TRIALS_CSV))
        if best is not None:
            _safe("log_artifact", c.log_artifact, parent_id, str(out / BEST_CONFIG))
        for p in plots:
            _safe("log_artifact", c.log_artifact, parent_id, str(p), PLOTS_DIR)
        _safe("end of the sweep run", end_run, uri, parent_id, "FINISHED", {STATUS_TAG: "completed"})
    if remote:
        shutil.rmtree(out)
    plot_paths = [f"{sweep_dir}/{PLOTS_DIR}/{p.name}" for p in plots]
    return SweepResult(sweep_dir, rows, best, best_path, parent_id, uri, plot_paths)



def linear_eval_best(result: SweepResult, sweep: SweepConfig, n: int, recipe: str | None,
                     overrides: list[str] | None = None, address: str | None = None) -> list[dict[str, Any]]:
    """Linear evaluation (jobs.linear) of the best `n` completed trials; one linear run per trial.

    Each linear run links to its trial's MLflow run (so `compare` joins them); without tracking it
    reads the trial's last checkpoint directly.
    """
    from ..linear_config import load_linear_config
    from .linear import LinearEvalFailed, run_linear_eval

    col = f"best_{sweep.metric}"
    sign = 1.0 if sweep.mode == "max" else -1.0
    ranked = sorted((r for r in result.trials if r["status"] == "completed" and r[col] is not None),
                    key=lambda r: -sign * r[col])[:n]
    out = []
    for row in ranked:
        fixed: dict[str, Any] = {"run.name": trial_run_name(sweep.name, row["trial_id"]) + "-linear"}
        if row.get("mlflow_run_id"):
            fixed.update({"encoder.pretrain_run": row["mlflow_run_id"], "tracking.tracking_uri": result.tracking_uri})
        else:
            fs, run_path = fsspec.core.url_to_fs(row["run_dir"])
            checkpoints = sorted(fs.glob(run_path + "/epoch_*"))
            if not checkpoints:
                print(f"[mocoray] trial {row['trial_id']}: no checkpoint to evaluate")
                continue
            last = checkpoints[-1] if "://" not in row["run_dir"] else fs.unstrip_protocol(checkpoints[-1])
            fixed.update({"encoder.checkpoint": last, "tracking.enabled": False})
        cfg = load_linear_config(recipe, overrides, fixed)
        try:
            res = run_linear_eval(cfg, address=address)
        except (LinearEvalFailed, LookupError, ValueError) as err:
            print(f"[mocoray] linear evaluation of trial {row['trial_id']} failed: {err}")
            out.append({"trial_id": row["trial_id"], "status": "failed", "error": str(err)})
            continue
        out.append({"trial_id": row["trial_id"], "status": res.status, "mlflow_run_id": res.mlflow_run_id,
                    **{k: res.metrics.get(k) for k in ("linear_top1", "linear_top5")}})
    if out:
        print("\n" + _format_table(out, ["trial_id", "linear_top1", "linear_top5", "status"]))
    return out
