"""`mocoray sweep`: Ray Tune over K, m and tau, each trial a Ray Train run, tracked as MLflow parent/children."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EXPERIMENTS, REPO, tiny_sweep_overrides
from mocoray.cli import main
from mocoray.config import ConfigError, SweepConfig, build, load_config, load_sweep_config
from mocoray.config.sweep import trial_base
from mocoray.jobs.sweep import run_sweep, trial_run_name, tune_space
from mocoray.tracking.client import JOB_TAG, STATUS_TAG, SWEEP_RUN_TAG

TINY = EXPERIMENTS / "sweep_digits_tiny.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


tiny_overrides = tiny_sweep_overrides


def children_of(uri: str, experiment: str, parent_id: str) -> list:
    c = mlflow.MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_RUN_TAG}` = '{parent_id}'")


# ---------------------------------------------------------------------------------------------------
# The space is checked before any trial


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("space.moco.queu_size={grid: [16, 64]}",
         "space.moco.queu_size: unknown field; allowed fields of moco: version, queue_size, momentum"),
        ("space.mocoo.queue_size={grid: [16, 64]}", "space.mocoo.queue_size: unknown field; allowed top-level"),
        ("space.moco.momentum={uniform: [0.9, 1.5]}",
         "space.moco.momentum: uniform upper end 1.5 is not a valid moco.momentum:\n  moco.momentum=1.5: "
         "Input should be less than 1"),
        ("space.moco.temperature={loguniform: [0.0, 0.5]}", "loguniform: low 0.0 must be > 0"),
        ("space.moco.queue_size={grid: [0, 4096]}", "space.moco.queue_size: grid value 0 is not a valid"),
        ("space.moco.bn_mode={choice: [split, bogus]}", "moco.bn_mode='bogus': Input should be"),
        ("space.moco.num_splits={randint: [1, 3]}", "must be divisible by moco.num_splits=3"),
        ("space.run.name={grid: [a, b]}", "space.run.name: set by the sweep for each trial"),
    ],
)
def test_bad_search_space_fails_before_any_trial_with_a_message_naming_the_field(tmp_path, capsys, entry, message):
    args = ["sweep", str(TINY), "--set", entry]
    for item in tiny_overrides(tmp_path, "bad"):
        args += ["--set", item]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()  # nothing was started, not even the sweep folder


def test_run_sweep_validates_a_programmatic_sweep_before_starting_ray(tmp_path):
    sweep = build(SweepConfig, {"base": {"optim": {"epochs": 2}}, "storage_path": str(tmp_path),
                                "space": {"moco.momentum": {"uniform": [0.9, 1.5]}}})
    with pytest.raises(ConfigError, match="moco.momentum=1.5: Input should be less than 1"):
        run_sweep(sweep)
    assert not (tmp_path / "sweep").exists()


def test_asha_grace_period_longer_than_the_trials_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"scheduler.grace_period=5 must be <= scheduler.max_t=3"):
        load_sweep_config(TINY, tiny_overrides(tmp_path, "g", **{"scheduler.grace_period": "5"}))


def test_integer_fields_get_integer_samples_and_float_fields_log_uniform_ones(tmp_path):
    from ray.tune.search.sample import Float, Integer

    sweep = load_sweep_config(TINY, tiny_overrides(tmp_path, "s", **{
        "space.moco.queue_size": "{loguniform: [1024, 65536]}"}))
    space = tune_space(sweep)
    assert isinstance(space["moco.queue_size"], Integer)
    assert (space["moco.queue_size"].lower, space["moco.queue_size"].upper) == (1024, 65537)  # high included
    assert isinstance(space["moco.temperature"], Float)
    assert space["moco.momentum"] == {"grid_search": [0.9, 0.99]}


def test_resume_of_a_folder_without_a_sweep_says_what_to_pass(tmp_path, capsys):
    assert main(["sweep", "--resume", str(tmp_path)]) == 1
    assert "is not a sweep folder (no sweep.yaml)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"run.num_workers": "1"}, 2),  # 1 driver + 1 worker = 2 CPUs: two trials on the 4-CPU test cluster
        ({"run.num_workers": "2"}, 1),  # 1 + 2: one trial
        # a searched worker count counts at its largest: 1 + 2 CPUs, one trial (not two)
        ({"run.num_workers": "1", "space.run.num_workers": "{choice: [1, 2]}"}, 1),
    ],
)
def test_concurrency_fits_the_largest_trial_into_the_cluster(ray_session, tmp_path, extra, expected):
    from mocoray.config.sweep import trial_base
    from mocoray.jobs.sweep import concurrency

    one_cpu_each = {"resources.trial_cpus": "1", "resources.cpus_per_worker": "1", "max_concurrent_trials": "null"}
    sweep = load_sweep_config(TINY, tiny_overrides(tmp_path, "fit", **one_cpu_each, **extra))
    assert concurrency(sweep, trial_base(sweep)) == expected


def test_heatmap_of_the_first_two_grids_averages_over_a_third_one(tmp_path):
    from mocoray.jobs.sweep.report import heatmap_cells, make_plots

    sweep = build(SweepConfig, {"base": {"optim": {"epochs": 2}}, "metric": "logreg_top1", "space": {
        "data.flip_p": {"grid": [0.5, 0.0]}, "moco.head_bn": {"grid": [False, True]}, "run.seed": {"grid": [0, 1]}}})
    rows = [{"data.flip_p": f, "moco.head_bn": h, "run.seed": s, "status": "completed",
             "best_logreg_top1": 0.9 + (0.04 if f == 0 else 0) + (0.02 if h else 0) + 0.01 * s}
            for f in (0.5, 0.0) for h in (False, True) for s in (0, 1)]
    a, b, xs, ys, cells = heatmap_cells(rows, sweep)
    assert (a, b, xs, ys) == ("data.flip_p", "moco.head_bn", [0.5, 0.0], [False, True])
    assert cells.flatten().tolist() == pytest.approx([0.905, 0.945, 0.925, 0.965])  # rows: head_bn; 2 seeds each
    names = sorted(p.name for p in make_plots(rows, sweep, tmp_path))
    assert "heatmap_data.flip_p_moco.head_bn.png" in names and len(names) == 4
    assert heatmap_cells(rows, build(SweepConfig, {"space": {"run.seed": {"grid": [0, 1]}}})) is None


def test_heatmap_averages_only_trials_that_ran_to_the_end(tmp_path):
    """An ASHA-stopped trial's metric is from fewer epochs: averaged with completed trials it would drag
    their cell down (or, with a loss, up) on one colour scale. It is left out; a cell of only stopped trials
    stays empty."""
    from mocoray.jobs.sweep.report import heatmap_cells, make_plots

    sweep = build(SweepConfig, {"base": {"optim": {"epochs": 4}}, "space": {
        "moco.queue_size": {"grid": [16, 64]}, "moco.momentum": {"grid": [0.9, 0.99]}}})
    rows = [
        {"moco.queue_size": 16, "moco.momentum": 0.9, "status": "completed", "best_knn_top1": 0.8},
        {"moco.queue_size": 16, "moco.momentum": 0.9, "status": "early_stopped", "best_knn_top1": 0.2},
        {"moco.queue_size": 64, "moco.momentum": 0.9, "status": "completed", "best_knn_top1": 0.6},
        {"moco.queue_size": 64, "moco.momentum": 0.9, "status": "completed", "best_knn_top1": 0.7},
        {"moco.queue_size": 16, "moco.momentum": 0.99, "status": "early_stopped", "best_knn_top1": 0.3},
        {"moco.queue_size": 64, "moco.momentum": 0.99, "status": "error", "best_knn_top1": None},
    ]
    _, _, _, _, cells = heatmap_cells(rows, sweep)
    assert cells[0].tolist() == pytest.approx([0.8, 0.65])  # momentum 0.9: the stopped 0.2 is not in the mean
    assert np.isnan(cells[1]).all()  # momentum 0.99: nothing ran to the end
    assert "heatmap_moco.queue_size_moco.momentum.png" in {p.name for p in make_plots(rows, sweep, tmp_path)}


def test_shipped_sweep_recipes_validate():
    cifar = load_sweep_config(EXPERIMENTS / "sweep_k_m_tau_cifar10.yaml")
    assert cifar.space["moco.queue_size"].values == [1024, 4096, 16384, 65536]
    assert cifar.space["moco.temperature"].bounds == (0.05, 0.5)
    assert cifar.resources.gpus_per_worker == 0.5
    tiny = load_sweep_config(TINY)
    assert set(tiny.space) == {"moco.queue_size", "moco.momentum", "moco.temperature"}
    # the demo's tuning rounds 4 and 5 (docs/tuning.md): full grids ranked by logistic regression
    head_flip = load_sweep_config(EXPERIMENTS / "sweep_digits_head_flip.yaml")
    assert [s.values for s in head_flip.space.values()] == [[0.5, 0.0], [False, True], [0.4, 0.0]]
    m_epochs = load_sweep_config(EXPERIMENTS / "sweep_digits_m_epochs.yaml")
    for sweep in (head_flip, m_epochs):
        assert sweep.metric == "logreg_top1" and sweep.scheduler.type == "fifo" and trial_base(sweep).knn.logreg
    assert trial_base(m_epochs).data.flip_p == 0.0  # round 4's winner


# ---------------------------------------------------------------------------------------------------
# A real sweep on CPU


def test_cpu_sweep_over_k_m_tau_tracks_every_trial_stops_some_early_and_returns_the_best_config(k_m_tau_sweep):
    res, sweep, tmp_path = k_m_tau_sweep["res"], k_m_tau_sweep["sweep"], k_m_tau_sweep["tmp"]
    assert sweep.max_concurrent_trials == 2 and sweep.scheduler.type == "asha"

    rows = {r["trial_id"]: r for r in res.trials}
    assert len(rows) == 4
    assert {(r["moco.queue_size"], r["moco.momentum"]) for r in rows.values()} == {
        (16, 0.9), (16, 0.99), (512, 0.9), (512, 0.99)}
    assert all(0.15 <= r["moco.temperature"] <= 0.25 for r in rows.values())
    statuses = [r["status"] for r in rows.values()]
    assert "completed" in statuses
    assert all(r["status"] == "early_stopped" for r in rows.values() if r["moco.queue_size"] == 512)
    assert all(r["epochs"] < 3 for r in rows.values() if r["status"] == "early_stopped")

    # MLflow: one parent, one child per trial with the trial's own params, like any pretraining run
    c = mlflow.MlflowClient(res.tracking_uri)
    parent = c.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[JOB_TAG] == "sweep"
    assert parent.data.tags["mlflow.source.name"] == "mocoray sweep sweep_digits_tiny.yaml"
    assert parent.data.params["space.moco.queue_size"] == "grid[16, 512]"
    assert parent.data.params["space.moco.temperature"] == "loguniform[0.15, 0.25]"
    assert parent.data.params["scheduler.type"] == "asha"
    assert parent.data.params["scheduler.grace_period"] == "1"
    assert parent.data.metrics["best_loss"] == pytest.approx(res.best["best_loss"])
    assert parent.data.metrics["trials_early_stopped"] >= 2
    assert parent.data.params["best.moco.queue_size"] == str(res.best["moco.queue_size"])
    artifacts = {a.path for a in c.list_artifacts(res.parent_run_id)}
    assert {"trials.csv", "best_config.yaml", "config.yaml", "command.txt", "environment.json", "plots"} <= artifacts
    assert len(c.list_artifacts(res.parent_run_id, "plots")) == 4  # 3 fields + the K x m heatmap

    children = children_of(res.tracking_uri, "sweep-tests", res.parent_run_id)
    assert len(children) == 4
    for child in children:
        tags, params = child.data.tags, child.data.params
        row = rows[tags["mocoray.trial_id"]]
        assert tags[JOB_TAG] == "pretrain"
        assert tags["mlflow.parentRunId"] == res.parent_run_id
        # the runs table's Source: the job and its recipe, slash-free (the UI shows the last path segment)
        assert tags["mlflow.source.name"] == f"mocoray sweep sweep_digits_tiny.yaml trial {row['trial_id']}"
        assert child.info.run_name == trial_run_name("k-m-tau", row["trial_id"])
        assert params["moco.queue_size"] == str(row["moco.queue_size"])
        assert params["moco.momentum"] == str(row["moco.momentum"])
        assert float(params["moco.temperature"]) == pytest.approx(row["moco.temperature"])
        assert params["optim.epochs"] == "3" and params["data.max_images"] == "256"
        assert "loss" in child.data.metrics and "knn_top1" in child.data.metrics
        if row["status"] == "early_stopped":
            assert child.info.status == "KILLED"
            assert tags[STATUS_TAG] == "early_stopped"
        else:
            assert child.info.status == "FINISHED"
            assert tags[STATUS_TAG] == "completed"

    # the best config is a ready-to-run pretraining recipe with the best trial's values
    assert res.best["status"] == "completed"
    best = load_config(res.best_config_path)
    assert best.moco.queue_size == res.best["moco.queue_size"] == 16
    assert best.moco.momentum == res.best["moco.momentum"]
    assert best.moco.temperature == pytest.approx(res.best["moco.temperature"])
    assert best.run.name == "k-m-tau-best"
    assert best.run.storage_path == str(tmp_path / "runs")
    assert best.optim.epochs == 3

    # plots: valid PNGs, one per field plus the heatmap of the two grid fields
    names = sorted(Path(p).name for p in res.plots)
    assert names == ["heatmap_moco.queue_size_moco.momentum.png", "loss_vs_moco.momentum.png",
                     "loss_vs_moco.queue_size.png", "loss_vs_moco.temperature.png"]
    for p in res.plots:
        assert Path(p).read_bytes()[:8] == PNG_MAGIC
        with Image.open(p) as im:
            im.verify()
    assert (Path(res.sweep_dir) / "trials.csv").read_text().count("\n") == 5

    # --then-linear-eval 1: the best trial's backbone evaluated, the linear run linked to the trial's run
    linear = k_m_tau_sweep["linear"]
    assert [(r["trial_id"], r["status"]) for r in linear] == [(res.best["trial_id"], "completed")]
    linear_run = c.get_run(linear[0]["mlflow_run_id"])
    assert linear_run.data.tags["mocoray.pretrain_run_id"] == res.best["mlflow_run_id"]
    assert 0.0 <= linear_run.data.metrics["linear_top1"] <= 1.0
    assert linear_run.data.tags["mlflow.source.name"] == "mocoray linear-eval linear_digits.yaml"

    # the linear results on the trial (transfer.*), and descriptions that name the runs they link
    trial = c.get_run(res.best["mlflow_run_id"])
    assert trial.data.metrics["transfer.linear_top1"] == linear_run.data.metrics["linear_top1_final"]
    assert trial.data.metrics["transfer.linear_top5"] == linear_run.data.metrics["linear_top5_final"]
    assert linear[0]["mlflow_run_id"] in trial.data.tags["mlflow.note.content"]
    assert f"sweep run `{res.parent_run_id}`" in trial.data.tags["mlflow.note.content"]
    assert f"pretraining run `{res.best['mlflow_run_id']}`" in linear_run.data.tags["mlflow.note.content"]
    assert "Linear top-1 **" in linear_run.data.tags["mlflow.note.content"]
    note = c.get_run(res.parent_run_id).data.tags["mlflow.note.content"]
    table = [line for line in note.splitlines() if line.startswith("|")]
    assert table[0].startswith("| trial | moco.momentum | moco.queue_size | moco.temperature | best loss |")
    assert "transfer.linear_top1" in table[0]
    assert len(table) == 2 + 4 and table[2].startswith(f"| {res.best['trial_id']} |")  # best first


def test_a_trial_run_ended_killed_by_the_sweep_keeps_that_status_when_its_own_process_fails_later(tmp_path):
    """Tune's early stop and the stopped trial's own process race to end the trial's run: the sweep's KILLED
    (early_stopped) must stand, whichever order they come in; a run nobody else ended still gets FAILED."""
    from mocoray.jobs.pretrain.driver import close_tracking
    from mocoray.jobs.runtime import JobRun
    from mocoray.jobs.sweep.driver import _close_child, _early_stop_tags
    from mocoray.tracking.client import start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = mlflow.MlflowClient(uri)
    jobs = {}
    for name in ("stopped", "failing"):
        run_dir = tmp_path / name
        run_dir.mkdir()
        run_id = start_run(uri, "race", name, {}, {JOB_TAG: "pretrain"}, run_key=str(run_dir))
        jobs[name] = JobRun(str(tmp_path), str(run_dir), str(run_dir / "status.json"), uri, run_id)
    assert _close_child(uri, "race", str(tmp_path / "stopped"), "KILLED", _early_stop_tags(1, 3)) \
        == jobs["stopped"].mlflow_run_id

    for job in jobs.values():  # what the trial's process does when its Train run ends without completing
        close_tracking(job, "FAILED", {STATUS_TAG: "running"})
        job.end_tracking("FAILED", {STATUS_TAG: "failed"}, only_if_running=True)
    stopped = c.get_run(jobs["stopped"].mlflow_run_id)
    assert stopped.info.status == "KILLED" and stopped.data.tags[STATUS_TAG] == "early_stopped"
    assert stopped.data.tags["mocoray.epochs_run"] == "1"
    failing = c.get_run(jobs["failing"].mlflow_run_id)
    assert failing.info.status == "FAILED" and failing.data.tags[STATUS_TAG] == "running"


def test_a_stopped_trial_whose_process_released_its_run_key_is_still_closed_and_listed_with_its_run(tmp_path):
    """ASHA stopping a trial at its first report can cut its first checkpoint short; a trial's process that then
    fails used to free the run's name (its key) as for a plain failed run, and the sweep lost track of the run
    (no run id in trials.csv). The sweep finds it by its trial id under the sweep's run."""
    from mocoray.jobs.sweep.driver import _close_children
    from mocoray.tracking.client import release_run_key, start_run
    from mocoray.tracking.describe import TRIAL_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_run(uri, "keys", "sweep", {}, {JOB_TAG: "sweep"})
    run_id = start_run(uri, "keys", "trial", {}, {JOB_TAG: "pretrain", SWEEP_RUN_TAG: parent, TRIAL_TAG: "t_00001"},
                       run_key=str(tmp_path / "trial"))
    release_run_key(uri, run_id)
    rows = [{"run_dir": str(tmp_path / "trial"), "trial_id": "t_00001", "status": "early_stopped", "epochs": 1,
             "planned_epochs": 3}]
    _close_children(rows, uri, "keys", parent)
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert rows[0]["mlflow_run_id"] == run_id and run.info.status == "KILLED"
    assert run.data.tags[STATUS_TAG] == "early_stopped"


def test_a_completed_trial_tune_cut_before_its_epilogue_is_tagged_with_its_newest_complete_checkpoint(tmp_path):
    """ASHA can stop a trial at its last epoch: the trial never tags its final checkpoint, which linear
    evaluation (`--then-linear-eval`) and the study's downstream runs load. The sweep's close-up tags it."""
    from mocoray.checkpoints import save_training_checkpoint
    from mocoray.jobs.sweep.driver import _close_children
    from mocoray.tracking.client import CHECKPOINT_TAG, start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "trial"
    for epoch in (2, 4):
        save_training_checkpoint(run_dir / f"epoch_{epoch:04d}", rank=0, model_state={"w": torch.ones(2)},
                                 optimizer_state={}, scaler_state={}, train_state={"epoch": epoch},
                                 meta={"world_size": 1})
    (run_dir / "epoch_0004" / "optimizer.pt").write_bytes(b"PK")  # cut mid-upload: not a complete checkpoint
    run_id = start_run(uri, "cut", "trial", {}, {JOB_TAG: "pretrain"}, run_key=str(run_dir))
    rows = [{"run_dir": str(run_dir), "status": "completed", "epochs": 4, "planned_epochs": 4}]
    _close_children(rows, uri, "cut")
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert rows[0]["mlflow_run_id"] == run_id and run.info.status == "FINISHED"
    assert run.data.tags[CHECKPOINT_TAG] == str(run_dir / "epoch_0002")


# ---------------------------------------------------------------------------------------------------
# Resume after Ctrl-C (a killed driver: tests/test_study.py, whose sweep is restored after a SIGKILL)


def _terminated_and_open(sweep_dir: Path) -> tuple[set[str], set[str]]:
    """Trial ids Tune's saved experiment state marks TERMINATED, and the others."""
    from ray.tune import ExperimentAnalysis

    if not list(sweep_dir.glob("experiment_state-*.json")):
        return set(), set()
    try:
        trials = ExperimentAnalysis(str(sweep_dir)).trials
    except Exception:  # caught mid-write: look again
        return set(), set()
    done = {t.trial_id for t in trials if t.status == "TERMINATED"}
    return done, {t.trial_id for t in trials} - done


def _trial_footprint(sweep_dir: Path, trial_id: str) -> dict:
    """What a re-run of a trial would change: its Tune results and its Ray Train run's files."""
    results = (sweep_dir / f"trial_{trial_id}" / "result.json").read_text().splitlines()
    run_dir = sweep_dir / "train" / trial_run_name("resume", trial_id)
    files = {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    return {"results": [json.loads(line)["epoch"] for line in results], "files": files}


def test_sweep_interrupted_mid_run_says_so_and_resumes_without_rerunning_finished_trials(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    # 2 trials of 2 epochs, one at a time: the driver is interrupted while the second one runs
    overrides = tiny_overrides(tmp_path, "resume", max_concurrent_trials="1", **{
        "optim.epochs": "2",
        "knn.logreg": "false",  # the recipe's logistic regression after the last epoch: nothing here reads it
        "scheduler.type": "fifo",
        "space.moco.queue_size": "{grid: [16, 64]}",
        "space.moco.momentum": "{grid: [0.99]}",
        "space.moco.temperature": "{choice: [0.2]}",
    })
    cmd = [sys.executable, "-m", "mocoray.cli", "sweep"]
    sets = [arg for item in overrides for arg in ("--set", item)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sweep_dir = tmp_path / "sweeps" / "resume"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen([*cmd, str(TINY), *sets, "--address", address], stdout=log,
                                  stderr=subprocess.STDOUT, cwd=REPO, env=env)
        deadline = time.time() + 300
        done: set[str] = set()
        while time.time() < deadline and driver.poll() is None:
            done, still_open = _terminated_and_open(sweep_dir)
            if done and still_open:
                break
            time.sleep(1)
        if driver.poll() is not None:
            pytest.fail(f"the sweep ended before it could be killed:\n{(tmp_path / 'first.log').read_text()[-3000:]}")
        driver.send_signal(signal.SIGINT)  # Ctrl-C: Tune stops its run; the trials it cut read TERMINATED
        code = driver.wait(timeout=120)
    first = (tmp_path / "first.log").read_text()
    assert done, f"no trial finished in time:\n{first[-3000:]}"
    # an interrupted sweep is not a finished one: no table, no best config, its run KILLED, how to go on
    assert code == 130 and f"mocoray sweep --resume {sweep_dir}" in first, first[-3000:]
    assert not (sweep_dir / "trials.csv").exists() and not (sweep_dir / "best_config.yaml").exists()
    before = {t: _trial_footprint(sweep_dir, t) for t in done}
    c = mlflow.MlflowClient(uri)
    parent_id = c.search_runs([c.get_experiment_by_name("sweep-tests").experiment_id],
                              filter_string=f"tags.`{JOB_TAG}` = 'sweep'")[0].info.run_id
    history_before = {r.data.tags["mocoray.trial_id"]: len(c.get_metric_history(r.info.run_id, "loss"))
                      for r in children_of(uri, "sweep-tests", parent_id)}
    assert c.get_run(parent_id).info.status == "KILLED"

    resumed = subprocess.run([*cmd, "--resume", str(sweep_dir), "--address", address], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    # finished trials were kept as they were: no new results, no new or rewritten files, no new metrics
    for trial_id, footprint in before.items():
        assert _trial_footprint(sweep_dir, trial_id) == footprint
        assert footprint["results"] == [1, 2]
    children = children_of(uri, "sweep-tests", parent_id)
    assert len(children) == 2  # one MLflow run per trial, the resumed trial's run reopened, not duplicated
    for child in children:
        trial_id = child.data.tags["mocoray.trial_id"]
        assert child.info.status == "FINISHED"
        if trial_id in before:
            assert len(c.get_metric_history(child.info.run_id, "loss")) == history_before[trial_id]
    # the sweep as a whole finished: both trials completed all their epochs, under the same parent run
    rows = (sweep_dir / "trials.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",2,2,completed," in row for row in rows[1:])
    assert c.get_run(parent_id).info.status == "FINISHED"
    assert (sweep_dir / "best_config.yaml").is_file()
