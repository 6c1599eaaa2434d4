"""MoCo v3 beside v2 in one MLflow store: a v3 sweep of ViT trials (Ray Tune, each trial 2 Ray Train workers on
gloo), the linear evaluation of its best trial, and `mocoray compare` with the v2 sweep's rows next to them."""

from __future__ import annotations

import csv
import io
import sqlite3
import time
from pathlib import Path

import mlflow
import torch

from conftest import EXPERIMENTS, tiny_sweep_overrides
from mocoray.cli import main
from mocoray.config import TrackingConfig, load_sweep_config
from mocoray.config.linear import EncoderConfig
from mocoray.encoders import backbone_state_dict, load_backbone, resolve_encoder
from mocoray.jobs.linear.driver import linear_eval_best
from mocoray.jobs.sweep import run_sweep
from mocoray.tracking.client import BACKBONE_TAG, JOB_TAG, MLFLOW_PARENT_TAG, SWEEP_RUN_TAG
from mocoray.tracking.describe import set_recipes
from mocoray.tracking.registry import register_encoder

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


def test_a_v3_vit_sweep_and_its_linear_evaluation_sit_beside_the_v2_sweep_in_compare(k_m_tau_sweep, tmp_path,
                                                                                    capsys):
    v2 = k_m_tau_sweep["res"]
    uri = copy_store(Path(v2.tracking_uri.removeprefix("sqlite:///")), tmp_path)
    started = time.monotonic()
    # kNN at init and at the end only: each is ~1,000 val images through the ViT
    sweep = load_sweep_config(V3_SWEEP, tiny_sweep_overrides(tmp_path, "v3-tau", **{"optim.epochs": "2",
                                                                                       "knn.every": "2"}))
    assert sweep.tracking["tracking_uri"] == uri
    set_recipes(sweep=str(V3_SWEEP), linear=str(LINEAR))  # what `mocoray sweep --then-linear-eval` records
    try:
        res = run_sweep(sweep)
        # cls named although it is the default: the pooling a v3 linear number was measured with is on record
        linear = linear_eval_best(res, sweep, 1, str(LINEAR), [
            "optim.epochs=1", "data.max_images=256", f"run.storage_path={tmp_path / 'runs'}", "encoder.vit_pool=cls"])
    finally:
        set_recipes()
    took = time.monotonic() - started

    trials = {r["trial_id"]: r for r in res.trials}
    assert [r["status"] for r in trials.values()] == ["completed", "completed"]
    assert sorted(r["moco.temperature"] for r in trials.values()) == [0.1, 0.2]
    assert [(r["trial_id"], r["status"]) for r in linear] == [(res.best["trial_id"], "completed")]

    # the v3 trials are children of their sweep's run, as v2's are of theirs
    c = mlflow.MlflowClient(uri)
    exp = c.get_experiment_by_name("sweep-tests")
    children = c.search_runs([exp.experiment_id], f"tags.`{SWEEP_RUN_TAG}` = '{res.parent_run_id}'")
    assert sorted(ch.data.tags["mocoray.trial_id"] for ch in children) == sorted(trials)
    for child in children:
        assert child.data.tags[MLFLOW_PARENT_TAG] == res.parent_run_id and child.data.tags[JOB_TAG] == "pretrain"
        assert child.info.status == "FINISHED"
        assert child.data.params["moco.version"] == "v3" and child.data.params["model.arch"] == "vit_tiny_patch4_32"
        assert child.data.params["model.freeze_patch_embed"] == "True" and child.data.params["run.num_workers"] == "2"
        assert child.info.artifact_uri.startswith(str(tmp_path))  # the copy's folder, not the original store's
    assert c.get_run(res.parent_run_id).data.tags[JOB_TAG] == "sweep"
    v3_linear = c.get_run(linear[0]["mlflow_run_id"])
    assert v3_linear.data.tags["mocoray.pretrain_run_id"] == res.best["mlflow_run_id"]
    assert v3_linear.data.params["encoder.vit_pool"] == "cls"
    v2_linear = c.get_run(k_m_tau_sweep["linear"][0]["mlflow_run_id"])

    capsys.readouterr()
    assert main(["compare", "--tracking-uri", uri, "--experiment", "sweep-tests", "--csv"]) == 0
    rows = {r["run_id"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    v2_ids = {r["mlflow_run_id"] for r in v2.trials}
    v3_ids = {r["mlflow_run_id"] for r in res.trials}
    assert set(rows) == v2_ids | v3_ids  # the sweeps' own runs and the linear runs are not rows
    for rid in v2_ids:
        row = rows[rid]
        assert row["version"] == "v2" and row["arch"] == "small_resnet_slim_wide" and row["K"] in ("16", "512")
    for rid in v3_ids:
        row = rows[rid]
        assert row["version"] == "v3" and row["arch"] == "vit_tiny_patch4_32" and row["K"] == ""
        assert row["epochs"] == "2" and row["m"] == "0.99"
    for best, lin in ((v2.best, v2_linear), (res.best, v3_linear)):
        assert float(rows[best["mlflow_run_id"]]["linear_top1"]) == lin.data.metrics["linear_top1_final"]
    assert all(rows[rid]["linear_top1"] == "" for rid in (v2_ids | v3_ids) - {v2.best["mlflow_run_id"],
                                                                              res.best["mlflow_run_id"]})
    for rid in v3_ids:
        assert float(rows[rid]["knn_top1"]) == c.get_run(rid).data.metrics["knn_top1"]
    # the best v3 encoder through the Model Registry and back: the ViT the trial exported
    version = register_encoder(uri, res.best["mlflow_run_id"], "digits-v3-vit", ["champion"])
    enc = resolve_encoder(EncoderConfig(checkpoint="models:/digits-v3-vit@champion"), TrackingConfig(tracking_uri=uri))
    assert (enc.arch, enc.pretrain_run_id) == ("vit_tiny_patch4_32", res.best["mlflow_run_id"])
    loaded = load_backbone(enc)[0].state_dict()
    exported = backbone_state_dict(c.get_run(res.best["mlflow_run_id"]).data.tags[BACKBONE_TAG])
    assert loaded.keys() == exported.keys() and all(torch.equal(loaded[k], exported[k]) for k in exported)
    capsys.readouterr()
    assert main(["compare", "--tracking-uri", uri, "--experiment", "sweep-tests", "--csv"]) == 0
    registered = {r["run_id"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert registered[res.best["mlflow_run_id"]]["registered"] == f"digits-v3-vit/{version.version}"
    knn = ", ".join(f"tau {r['moco.temperature']}: {float(rows[r['mlflow_run_id']]['knn_top1']):.4f}"
                    for r in trials.values())
    with capsys.disabled():
        print(f"\nv3 sweep + linear eval: {took:.0f} s; v3 kNN {knn}; linear top-1 of the best v3 trial "
              f"{v3_linear.data.metrics['linear_top1_final']:.4f}, of the best v2 trial "
              f"{v2_linear.data.metrics['linear_top1_final']:.4f}")

