"""`mocoray study`: a sweep, linear and detection runs on its trials as they finish, the transfer analysis on
the study's MLflow run; a failed downstream run recorded, the study resumed after its driver was killed."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from PIL import Image
from scipy.stats import spearmanr

from conftest import EXPERIMENTS, REPO
from mocoray.cli import main
from mocoray.config import load_config
from mocoray.config.study import load_study_config
from mocoray.jobs.study import DownstreamFault, load_study_dir, run_study
from mocoray.jobs.study.analysis import rank_configs, spearman, summary_markdown, within_seed_noise
from mocoray.jobs.study.downstream import STATE_FILE, choose_trials
from mocoray.tracking.client import JOB_TAG, MLFLOW_PARENT_TAG, PRETRAIN_RUN_TAG, SWEEP_RUN_TAG

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAULTY_TRIAL = 2  # its detection run reads a VOC folder that does not exist


def study_recipe(tmp: Path, name: str, **extra) -> dict:
    """4 trials (K x tau grid) of a seconds-long pretraining, each evaluated by a cached linear probe of 2
    epochs and a detection run of 6 iterations. Every run here mostly waits for processes to start, so all
    4 trials and 4 downstream runs fit the 4-CPU test cluster at once (a quarter CPU per driver and worker)."""
    recipe = {
        "name": name,
        "storage_path": str(tmp / "studies"),
        "sweep": {
            "name": "tiny",
            "base": str(EXPERIMENTS / "digits_moco_v2.yaml"),
            "overrides": ["run.num_workers=1", "data.max_images=256", "data.image_size=16", "optim.batch_size=32",
                          "optim.epochs=2", "moco.num_splits=2", "knn.max_bank=256", "knn.every=1",
                          "knn.logreg=false", "moco.momentum=0.99", f"run.storage_path={tmp / 'runs'}"],
            "space": {"moco.queue_size": {"grid": [16, 64]}, "moco.temperature": {"grid": [0.1, 0.3]}},
            # kNN on so few steps barely moves (all four trials tie); the InfoNCE loss ranks them
            "metric": "loss",
            "mode": "min",
            "scheduler": {"type": "fifo"},
            "max_concurrent_trials": 4,
            "resources": {"trial_cpus": 0.25, "cpus_per_worker": 0.25},
            "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "study-tests"},
        },
        "linear": {"recipe": str(EXPERIMENTS / "linear_digits.yaml"),
                   "overrides": ["optim.epochs=2", "optim.milestones=[1]", "data.max_images=256",
                                 "data.image_size=16", "run.cpus_per_worker=0.25"]},
        "detection": {"recipe": str(EXPERIMENTS / "detect_digits.yaml"),
                      "overrides": ["data.train_canvases=24", "data.val_canvases=8", "optim.batch_size=4",
                                    "optim.warmup=1", "optim.milestones=[]", "run.num_workers=1",
                                    "eval.batch_size=8", "optim.epochs=1", "run.cpus_per_worker=0.25"]},
        "downstream": {"driver_cpus": 0.25, "max_concurrent": 4},
        "analysis": {"bootstrap_samples": 200},
    }
    recipe.update(extra)
    return recipe


def write_recipe(tmp: Path, recipe: dict) -> Path:
    path = tmp / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# ---------------------------------------------------------------------------------------------------
# Checked before Ray starts


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trails": "all"}, "trails"),
        ({"linear": {"recipe": "no_such_linear.yaml"}}, "linear.recipe: linear recipe not found: "),
        ({"trials": {"top": 5}}, "trials.top: top 5 + random 0 = 5 trials, but the sweep makes only 4"),
        ({"trials": {"top": 3, "random": 2}}, "trials.random: top 3 + random 2 = 5 trials"),
        ({"detection": {"recipe": str(EXPERIMENTS / "detect_digits.yaml"), "overrides": ["model.layout=c5"]}},
         "model.layout='c5': Input should be 'c4' or 'fpn'"),
        ({"linear": None, "detection": None}, "give linear: {recipe: ...} and/or detection"),
    ],
)
def test_bad_study_recipe_fails_before_ray_starts_naming_the_field(tmp_path, capsys, change, message):
    recipe = write_recipe(tmp_path, study_recipe(tmp_path, "bad", **change))
    assert main(["study", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    if "layout" in message:
        assert err.startswith("mocoray study: detection: ")  # which part of the study the field is in
    assert not (tmp_path / "studies").exists()  # nothing was started, not even the study folder


def test_bad_sweep_inside_a_study_is_named_as_the_sweep_s_field(tmp_path, capsys):
    recipe = write_recipe(tmp_path, study_recipe(tmp_path, "bad-space"))
    assert main(["study", str(recipe), "--set", "sweep.space.moco.queu_size={grid: [16, 64]}"]) == 2
    assert "sweep: space.moco.queu_size: unknown field" in capsys.readouterr().err
    assert main(["study", str(recipe), "--set", "trails.top=2"]) == 2
    assert "--set trails.top: unknown study field" in capsys.readouterr().err


def test_a_study_of_vit_trials_with_detection_is_refused_before_the_sweep_runs(tmp_path, capsys):
    recipe = study_recipe(tmp_path, "vit-detection", sweep=str(EXPERIMENTS / "sweep_digits_v3_tiny.yaml"))
    path = write_recipe(tmp_path, recipe)
    assert main(["study", str(path), "--set", f"storage_path={tmp_path / 'studies'}"]) == 2
    err = capsys.readouterr().err
    assert "detection: the sweep's trials include ViT encoders (model.arch=vit_tiny_patch4_32)" in err, err
    assert not (tmp_path / "studies").exists()
    # the same study without detection is a valid one (linear evaluation takes a ViT's class token)
    recipe.pop("detection")
    assert load_study_config(write_recipe(tmp_path, recipe)).kinds == ["linear"]


def test_resume_of_a_folder_without_a_study_says_what_to_pass(tmp_path, capsys):
    assert main(["study", "--resume", str(tmp_path)]) == 1
    assert "is not a study folder (no study.yaml)" in capsys.readouterr().err
    assert main(["study", "--resume", str(tmp_path), "--set", "trials.top=1"]) == 2
    assert "--resume continues the study saved in its folder; give no recipe or --set" in capsys.readouterr().err


def test_a_study_that_exists_is_not_started_again(tmp_path, capsys):
    recipe = write_recipe(tmp_path, study_recipe(tmp_path, "twice"))
    (tmp_path / "studies" / "twice").mkdir(parents=True)
    (tmp_path / "studies" / "twice" / "study.yaml").write_text("name: twice\n")
    assert main(["study", str(recipe)]) == 1
    assert "study 'twice' already exists at" in capsys.readouterr().err


def test_top_n_and_a_seeded_random_sample_of_the_others_are_chosen_from_completed_trials(tmp_path):
    study = load_study_config(write_recipe(tmp_path, study_recipe(
        tmp_path, "choose", trials={"top": 1, "random": 2, "seed": 3})))
    rows = [{"trial_id": f"t_{i:05d}", "best_knn_top1": v, "status": s, "mlflow_run_id": f"r{i}"}
            for i, (v, s) in enumerate([(0.5, "completed"), (0.9, "early_stopped"), (0.7, "completed"),
                                        (0.6, "completed"), (0.2, "completed")])]
    chosen = choose_trials(rows, study, "knn_top1", "max")
    assert chosen[0]["trial_id"] == "t_00002"  # the best completed one; the early-stopped 0.9 is not eligible
    assert len(chosen) == 3 and len({r["trial_id"] for r in chosen}) == 3
    assert "t_00001" not in {r["trial_id"] for r in chosen}
    assert choose_trials(rows, study, "knn_top1", "max") == chosen  # the seed fixes the draw


# ---------------------------------------------------------------------------------------------------
# The analysis on hand-made tables


def test_spearman_and_its_bootstrap_interval_match_scipy_and_bracket_it():
    rows = [{"status": "completed", "knn": k, "lin": v} for k, v in
            [(0.1, 0.3), (0.2, 0.2), (0.3, 0.5), (0.4, 0.45), (0.5, 0.7), (0.6, 0.65)]]
    rows.append({"status": "early_stopped", "knn": 0.9, "lin": 0.0})  # not comparable: left out
    corr = spearman(rows, "knn", "lin", 500, 0.9, 0)
    expected = spearmanr([r["knn"] for r in rows[:-1]], [r["lin"] for r in rows[:-1]]).statistic
    assert corr.n == 6 and corr.rho == pytest.approx(expected)
    assert corr.low <= corr.rho <= corr.high <= 1.0
    assert spearman(rows[:2], "knn", "lin", 100, 0.9, 0).rho is None  # too few trials to rank


def test_a_lead_smaller_than_the_seed_spread_is_reported_as_seed_noise():
    space = ["moco.queue_size", "run.seed"]
    values = {16: [0.50, 0.60, 0.55], 64: [0.56, 0.52, 0.60], 256: [0.30, 0.31, 0.29]}
    rows = [{"trial_id": f"{k}-{s}", "moco.queue_size": k, "run.seed": s, "status": "completed", "lin": v}
            for k, vs in values.items() for s, v in enumerate(vs)]
    ranked = rank_configs(rows, space, "lin")
    assert [g.values for g in ranked] == [{"moco.queue_size": 64}, {"moco.queue_size": 16}, {"moco.queue_size": 256}]
    assert ranked[0].n == 3 and ranked[0].mean == pytest.approx(0.56)
    assert ranked[0].std == pytest.approx(0.04)
    assert within_seed_noise(ranked) is True
    assert within_seed_noise(ranked[1:]) is False  # 16 vs 256: far apart
    text = summary_markdown("s", rows, space, "lin", "max", ["linear"], [], {"lin": ranked}, 0.9)
    assert "moco.queue_size=64: 0.5600 ± 0.0400 over 3 seeds" in text and "WITHIN seed noise" in text


# ---------------------------------------------------------------------------------------------------
# A real study: interrupted by killing its driver, then resumed


def _state(study_dir: Path) -> dict:
    try:
        return yaml.safe_load((study_dir / STATE_FILE).read_text())["downstream"]
    except (OSError, TypeError, KeyError, yaml.YAMLError):
        return {}


@pytest.fixture(scope="module")
def study(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    recipe = write_recipe(tmp, study_recipe(tmp, "transfer"))
    study_dir = tmp / "studies" / "transfer"
    address = ray_session.get_runtime_context().gcs_address
    faults = [{"trial_number": FAULTY_TRIAL, "kind": "detection",
               "overrides": ["data.name=voc", f"data.root={tmp / 'missing-voc'}"]}]
    driver_script = str(REPO / "tests" / "study_driver.py")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    spec = {"address": address, "recipe": str(recipe), "resume": None, "faults": faults}
    with open(tmp / "first.log", "w") as log:
        driver = subprocess.Popen([sys.executable, driver_script, json.dumps(spec)], stdout=log,
                                  stderr=subprocess.STDOUT, cwd=REPO, env=env)
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None:
            if any(r["status"] == "finished" for r in _state(study_dir).values()):
                break
            time.sleep(0.5)
        if driver.poll() is not None:
            pytest.fail(f"the study ended before it could be killed:\n{(tmp / 'first.log').read_text()[-3000:]}")
        driver.kill()  # no chance to clean up: trials and downstream runs in flight die with it
        driver.wait(timeout=30)
    before = {k: r for k, r in _state(study_dir).items() if r["status"] == "finished"}
    assert before, (tmp / "first.log").read_text()[-3000:]

    res = run_study(load_study_dir(str(study_dir)), resume=True, faults=[DownstreamFault(**f) for f in faults])
    return {"result": res, "before": before, "uri": f"sqlite:///{tmp / 'mlflow.db'}", "dir": study_dir,
            "first_log": tmp / "first.log"}


def _runs(c, filter_string: str) -> list:
    return c.search_runs([e.experiment_id for e in c.search_experiments()], filter_string)


def test_each_trial_gets_one_linear_and_one_detection_run_linked_both_ways_and_a_failure_is_recorded(study):
    res, c = study["result"], mlflow.MlflowClient(study["uri"])
    study_run = c.get_run(res.run_id)
    assert study_run.data.tags[JOB_TAG] == "study" and study_run.info.status == "FINISHED"
    sweep_id = study_run.data.tags["mocoray.study_sweep_run_id"]
    assert c.get_run(sweep_id).data.tags[MLFLOW_PARENT_TAG] == res.run_id  # study > sweep > trials
    trials = _runs(c, f"tags.`{SWEEP_RUN_TAG}` = '{sweep_id}'")
    assert len(trials) == 4
    for trial in trials:
        number = int(trial.data.tags["mocoray.trial_id"].rsplit("_", 1)[1])
        for job, link in (("linear", "mocoray.linear_run_id"), ("detection", "mocoray.detection_run_id")):
            runs = _runs(c, f"tags.`{JOB_TAG}` = '{job}' and tags.`{PRETRAIN_RUN_TAG}` = '{trial.info.run_id}'")
            finished = [r for r in runs if r.info.status == "FINISHED"]
            if job == "detection" and number == FAULTY_TRIAL:
                assert not finished and len(runs) == 1  # one record of the failure, also after the resume
                assert runs[0].info.status == "FAILED"
                assert f"data.root: {study['dir'].parents[1] / 'missing-voc'} does not exist" in \
                    runs[0].data.tags["mocoray.error"]
                continue
            assert len(finished) == 1, (job, [(r.info.run_id, r.info.status) for r in runs])
            assert trial.data.tags[link] == finished[0].info.run_id  # and the trial's run points back
    assert study_run.data.tags["mocoray.status"] == "completed, 1 downstream run(s) failed"
    summary = Path(c.download_artifacts(res.run_id, "summary.md")).read_text()
    assert study_run.data.tags["mlflow.note.content"] == summary[:5000]  # the UI's description: the analysis


def test_the_study_terminal_shows_mocoray_lines_with_their_trial_not_ray_s_output(study):
    text = study["first_log"].read_text()
    assert re.search(r"^\[mocoray\] study: (linear|detection) of trial \S+ finished$", text, re.M), text[-3000:]
    assert re.search(r"^\[trial \S+\] ", text, re.M), text[-3000:]  # a trial's epoch lines, named by trial
    for ray_output in ("(RayTrainWorker", "(_downstream_job", "Trial status", "INFO"):
        assert ray_output not in text, text[-3000:]


def test_resume_kept_the_downstream_runs_that_finished_before_the_kill(study):
    res, c = study["result"], mlflow.MlflowClient(study["uri"])
    after = _state(study["dir"])
    for key, record in study["before"].items():
        assert after[key]["run_id"] == record["run_id"]
        assert c.get_run(record["run_id"]).info.status == "FINISHED"
    assert len(after) == 8
    assert sorted(r["status"] for r in after.values()).count("failed") == 1
    assert res.rows and not res.interrupted


def _csv_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_transfer_csv_on_the_study_run_equals_what_the_trial_and_downstream_runs_hold(study, capsys):
    res, c = study["result"], mlflow.MlflowClient(study["uri"])
    table = _csv_rows(Path(c.download_artifacts(res.run_id, "transfer.csv")).read_text())
    assert len(table) == 4
    for row in table:
        trial = c.get_run(row["trial_run_id"])
        assert trial.data.tags["mocoray.trial_id"] == row["trial_id"]
        assert row["moco.queue_size"] == trial.data.params["moco.queue_size"]
        assert float(row["moco.temperature"]) == float(trial.data.params["moco.temperature"])
        losses = [m.value for m in c.get_metric_history(trial.info.run_id, "loss")]
        assert float(row["loss"]) == min(losses)  # the sweep's metric, at its best (mode min)
        assert row["status"] == "completed"
        linear = c.get_run(row["linear_run_id"])
        assert linear.data.tags[PRETRAIN_RUN_TAG] == trial.info.run_id
        assert float(row["linear_top1"]) == linear.data.metrics["linear_top1_final"]
        assert float(row["linear_top5"]) == linear.data.metrics["linear_top5_final"]
        assert row["linear_status"] == "finished"
        detection = c.get_run(row["detection_run_id"])
        assert detection.data.tags[PRETRAIN_RUN_TAG] == trial.info.run_id
        if row["detection_status"] == "failed":
            assert row["AP"] == "" and "does not exist" in row["detection_error"]
        else:
            for name in ("AP", "AP50", "AP75"):
                assert float(row[name]) == detection.data.metrics[name]
    assert [r["detection_status"] for r in table].count("failed") == 1

    # the same table from the tracking server alone
    assert main(["compare", "--study", res.run_id, "--csv", "--tracking-uri", study["uri"]]) == 0
    assert _csv_rows(capsys.readouterr().out) == table


def test_correlations_logged_on_the_study_run_equal_scipys_on_its_table(study):
    res, c = study["result"], mlflow.MlflowClient(study["uri"])
    table = _csv_rows(Path(c.download_artifacts(res.run_id, "transfer.csv")).read_text())
    metrics = c.get_run(res.run_id).data.metrics
    checked = 0
    for x, y in (("loss", "linear_top1"), ("loss", "linear_top5"), ("loss", "AP"), ("linear_top1", "AP")):
        pairs = [(float(r[x]), float(r[y])) for r in table if r[x] and r[y]]
        rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
        name = f"spearman_{x}_vs_{y}"
        if rho != rho:  # a constant column: no rank correlation, and none is logged
            assert name not in metrics
            continue
        checked += 1
        assert metrics[name] == pytest.approx(rho)
        assert metrics[f"{name}_low"] <= metrics[f"{name}_high"]
    assert checked >= 1
    summary = Path(c.download_artifacts(res.run_id, "summary.md")).read_text()
    assert "Rank correlation (Spearman, 90% bootstrap interval)" in summary
    assert "detection: DatasetNotFoundError: data.root:" in summary  # the failure, with its error


def test_best_configs_are_pretraining_recipes_with_the_best_trials_values_and_plots_are_pngs(study):
    res, c = study["result"], mlflow.MlflowClient(study["uri"])
    table = _csv_rows(Path(c.download_artifacts(res.run_id, "transfer.csv")).read_text())
    best_row = max(table, key=lambda r: float(r["linear_top1"]))
    best = load_config(res.best_configs["linear"])
    assert best.moco.queue_size == int(best_row["moco.queue_size"])
    assert best.moco.temperature == float(best_row["moco.temperature"])
    assert best.optim.epochs == 2 and best.run.name == "transfer-best-linear"
    assert load_config(res.best_configs["detection"]).run.name == "transfer-best-detect"
    artifacts = {a.path for a in c.list_artifacts(res.run_id)}
    assert {"transfer.csv", "summary.md", "best_linear_config.yaml", "best_detection_config.yaml", "plots"} <= artifacts
    plots = {Path(p).name for p in res.plots}
    assert {"linear_top1_vs_moco.queue_size.png", "AP_vs_loss.png",
            "heatmap_linear_top1_moco.queue_size_moco.temperature.png"} <= plots
    for p in res.plots:
        assert Path(p).read_bytes()[:8] == PNG_MAGIC
        with Image.open(p) as im:
            im.verify()
    assert len(c.list_artifacts(res.run_id, "plots")) == len(res.plots)


def test_shipped_study_recipes_validate():
    digits = load_study_config(EXPERIMENTS / "study_digits.yaml")
    assert digits.kinds == ["linear", "detection"] and digits.trials == "all"
    assert set(digits.sweep_config.space) >= {"moco.queue_size", "moco.temperature"}
    imagenet = load_study_config(EXPERIMENTS / "study_imagenet.yaml")
    assert imagenet.kinds == ["linear", "detection"]
    assert Path(imagenet.detection.recipe).name == "detect_voc_r50_c4.yaml"
