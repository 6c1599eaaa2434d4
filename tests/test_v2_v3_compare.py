"""MoCo v3 beside v2 in one MLflow store: a v3 study (a sweep of ViT trials through Ray Tune, each trial 2 Ray Train
workers on gloo, and the linear evaluation of its best trial), and `mocoray compare` with the v2 sweep's rows next to
them."""

from __future__ import annotations

import csv
import io
import sqlite3
import time
from pathlib import Path

import mlflow
import torch
import yaml

from conftest import EXPERIMENTS, tiny_sweep_overrides
from mocoray.cli import main
from mocoray.config import TrackingConfig
from mocoray.config.linear import EncoderConfig
from mocoray.config.study import load_study_config
from mocoray.encoders import backbone_state_dict, load_backbone, resolve_encoder
from mocoray.jobs.study import run_study
from mocoray.tracking.client import BACKBONE_TAG, JOB_TAG, MLFLOW_PARENT_TAG, SWEEP_RUN_TAG
from mocoray.tracking.registry import register_encoder
from mocoray.tracking.transfer import STUDY_SWEEP_TAG

V3_SWEEP = EXPERIMENTS / "sweep_digits_v3_tiny.yaml"
LINEAR = EXPERIMENTS / "linear_digits.yaml"


def copy_store(source: Path, target_dir: Path) -> str:
    """A copy of the SQLite store at `source` in `target_dir`; returns its URI.

    The experiments keep their artifact folder as an absolute path beside the original database: pointed at
    the copy's own folder, so the runs made here write nothing into the original store's folder. The copied
    runs keep reading their artifacts where they are."""
    target = target_dir / "mlflow.db"
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)  # consistent even if the file is mid-transaction, unlike copying its bytes
        dst.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)",
                    (str(source.parent / "mlartifacts"), str(target_dir / "mlartifacts")))
    return f"sqlite:///{target}"


def test_a_v3_vit_study_sits_beside_the_v2_sweep_in_compare(k_m_tau_sweep, tmp_path, capsys):
    v2 = k_m_tau_sweep["res"]
    uri = copy_store(Path(v2.tracking_uri.removeprefix("sqlite:///")), tmp_path)
    started = time.monotonic()
    # the v3 sweep through `mocoray study`: its best trial (by kNN) gets the linear evaluation as soon as the sweep
    # has ranked it. cls is named although it is the default: the pooling a v3 linear number was measured with is
    # on record. kNN at init and at the end only: each is ~1,000 val images through the ViT.
    recipe = tmp_path / "v3_study.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "v3-study", "storage_path": str(tmp_path / "studies"), "sweep": str(V3_SWEEP),
        "trials": {"top": 1},
        "linear": {"recipe": str(LINEAR), "overrides": ["optim.epochs=1", "data.max_images=256",
                                                         f"run.storage_path={tmp_path / 'runs'}", "encoder.vit_pool=cls"]},
        "downstream": {"driver_cpus": 0.5}, "analysis": {"bootstrap_samples": 100}}))
    study = load_study_config(recipe, [f"sweep.{o}" for o in tiny_sweep_overrides(
        tmp_path, "v3-tau", **{"optim.epochs": "2", "knn.every": "2"})])
    assert study.sweep["tracking"]["tracking_uri"] == uri
    res = run_study(study)
    took = time.monotonic() - started

    assert not res.interrupted and len(res.rows) == 2
    trials = {r["trial_id"]: r for r in res.rows}
    assert [r["status"] for r in trials.values()] == ["completed", "completed"]
    assert sorted(r["moco.temperature"] for r in res.rows) == [0.1, 0.2]
    best = max(res.rows, key=lambda r: r["knn_top1"])  # the sweep's metric picked the one trial evaluated
    assert [r["trial_id"] for r in res.rows if r["linear_status"] == "finished"] == [best["trial_id"]]

    # study > sweep > trials, as v2's trials are children of their sweep's run
    c = mlflow.MlflowClient(uri)
    study_run = c.get_run(res.run_id)
    assert study_run.data.tags[JOB_TAG] == "study" and study_run.info.status == "FINISHED"
    sweep_run_id = study_run.data.tags[STUDY_SWEEP_TAG]
    assert c.get_run(sweep_run_id).data.tags[MLFLOW_PARENT_TAG] == res.run_id
    exp = c.get_experiment_by_name("sweep-tests")
    children = c.search_runs([exp.experiment_id], f"tags.`{SWEEP_RUN_TAG}` = '{sweep_run_id}'")
    assert sorted(ch.data.tags["mocoray.trial_id"] for ch in children) == sorted(trials)
    for child in children:
        assert child.data.tags[MLFLOW_PARENT_TAG] == sweep_run_id and child.data.tags[JOB_TAG] == "pretrain"
        assert child.info.status == "FINISHED"
        assert child.data.params["moco.version"] == "v3" and child.data.params["model.arch"] == "vit_tiny_patch4_32"
        assert child.data.params["model.freeze_patch_embed"] == "True" and child.data.params["run.num_workers"] == "2"
        assert child.info.artifact_uri.startswith(str(tmp_path))  # the copy's folder, not the original store's
    assert c.get_run(sweep_run_id).data.tags[JOB_TAG] == "sweep"
    v3_linear = c.get_run(best["linear_run_id"])
    assert v3_linear.data.tags["mocoray.pretrain_run_id"] == best["trial_run_id"]
    assert v3_linear.data.params["encoder.vit_pool"] == "cls"
    assert v3_linear.data.metrics["linear_top1_final"] == best["linear_top1"]
    v2_linear = c.get_run(k_m_tau_sweep["linear"][0]["mlflow_run_id"])

    capsys.readouterr()
    assert main(["compare", "--tracking-uri", uri, "--experiment", "sweep-tests", "--csv"]) == 0
    rows = {r["run_id"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    v2_ids = {r["mlflow_run_id"] for r in v2.trials}
    v3_ids = {r["trial_run_id"] for r in res.rows}
    assert set(rows) == v2_ids | v3_ids  # the study's, the sweeps' own and the linear runs are not rows
    for rid in v2_ids:
        row = rows[rid]
        assert row["version"] == "v2" and row["arch"] == "small_resnet_slim_wide" and row["K"] in ("16", "512")
    for rid in v3_ids:
        row = rows[rid]
        assert row["version"] == "v3" and row["arch"] == "vit_tiny_patch4_32" and row["K"] == ""
        assert row["epochs"] == "2" and row["m"] == "0.99"
    for best_id, lin in ((v2.best["mlflow_run_id"], v2_linear), (best["trial_run_id"], v3_linear)):
        assert float(rows[best_id]["linear_top1"]) == lin.data.metrics["linear_top1_final"]
    assert all(rows[rid]["linear_top1"] == "" for rid in (v2_ids | v3_ids) - {v2.best["mlflow_run_id"],
                                                                              best["trial_run_id"]})
    for rid in v3_ids:
        assert float(rows[rid]["knn_top1"]) == c.get_run(rid).data.metrics["knn_top1"]
    # the best v3 encoder through the Model Registry and back: the ViT the trial exported
    version = register_encoder(uri, best["trial_run_id"], "digits-v3-vit", ["champion"])
    enc = resolve_encoder(EncoderConfig(checkpoint="models:/digits-v3-vit@champion"), TrackingConfig(tracking_uri=uri))
    assert (enc.arch, enc.pretrain_run_id) == ("vit_tiny_patch4_32", best["trial_run_id"])
    loaded = load_backbone(enc)[0].state_dict()
    exported = backbone_state_dict(c.get_run(best["trial_run_id"]).data.tags[BACKBONE_TAG])
    assert loaded.keys() == exported.keys() and all(torch.equal(loaded[k], exported[k]) for k in exported)
    capsys.readouterr()
    assert main(["compare", "--tracking-uri", uri, "--experiment", "sweep-tests", "--csv"]) == 0
    registered = {r["run_id"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert registered[best["trial_run_id"]]["registered"] == f"digits-v3-vit/{version.version}"
    knn = ", ".join(f"tau {r['moco.temperature']}: {float(rows[r['trial_run_id']]['knn_top1']):.4f}"
                    for r in res.rows)
    with capsys.disabled():
        print(f"\nv3 study (sweep + linear eval): {took:.0f} s; v3 kNN {knn}; linear top-1 of the best v3 trial "
              f"{v3_linear.data.metrics['linear_top1_final']:.4f}, of the best v2 trial "
              f"{v2_linear.data.metrics['linear_top1_final']:.4f}")

