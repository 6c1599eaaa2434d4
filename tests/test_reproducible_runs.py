"""A run found on a real `mlflow server` is all a teammate needs: rerun it from its config.yaml, evaluate its
encoder by run id after its checkpoint folder is gone, register it and evaluate it by registered name."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import EXPERIMENTS, tiny_pretrain_overrides
from mocoray.cli import main
from mocoray.config import load_config
from mocoray.data.fingerprint import dataset_records

LINEAR_SET = ["data.name=synthetic", "data.synthetic_images=128", "data.synthetic_classes=4", "data.image_size=16",
              "optim.epochs=2", "optim.milestones=[1]"]


def _download(uri: str, run_id: str, path: str, dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst),
                                                    tracking_uri=uri))


def _runs(c, experiment: str, job: str) -> list:
    exp_id = c.get_experiment_by_name(experiment).experiment_id
    return c.search_runs([exp_id], f"tags.`mocoray.job` = '{job}'", order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def served(ray_session, mlflow_server, tmp_path_factory):
    """One tiny pretraining run (1 epoch, synthetic data) tracked on the server, started by the CLI."""
    tmp = tmp_path_factory.mktemp("served")
    experiment = f"repro-{tmp.name}"
    overrides = tiny_pretrain_overrides(tmp, "source-run", **{"tracking.tracking_uri": mlflow_server,
                                                              "tracking.experiment": experiment, "optim.epochs": 1})
    assert main(["pretrain", *[f"--set={o}" for o in overrides]]) == 0
    c = mlflow.MlflowClient(mlflow_server)
    (run,) = _runs(c, experiment, "pretrain")
    run_dir = Path(run.data.tags["mocoray.run_dir"])
    backbone = torch.load(run_dir / "backbone.pt", weights_only=True)
    return {"uri": mlflow_server, "c": c, "experiment": experiment, "run": run, "run_dir": run_dir,
            "backbone": backbone, "overrides": overrides, "tmp": tmp}


def test_pretraining_run_holds_its_recipe_command_environment_data_and_encoder(served, tmp_path):
    c, run, uri = served["c"], served["run"], served["uri"]
    run_id = run.info.run_id
    files = {a.path for a in c.list_artifacts(run_id)} | {a.path for a in c.list_artifacts(run_id, "encoder")}
    assert {"config.yaml", "command.txt", "environment.json", "encoder/backbone.pt", "encoder/encoder.json"} <= files

    command = _download(uri, run_id, "command.txt", tmp_path).read_text()
    assert "mocoray pretrain --set=model.arch=small_resnet" in command
    assert run.data.tags["mlflow.source.name"] == "mocoray pretrain digits_moco_v2.yaml"  # job + (default) recipe
    env = json.loads(_download(uri, run_id, "environment.json", tmp_path).read_text())
    assert env["versions"]["torch"] == torch.__version__ and env["versions"]["mlflow"] == mlflow.__version__
    assert env["world_size"] == 1 and env["device"] == "cpu"

    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    expected = {r.name: r for r in dataset_records(load_config(None, served["overrides"]).data, pretraining=True)}
    assert set(inputs) == {"synthetic/train", "synthetic/val"}
    for name, record in expected.items():
        assert inputs[name].dataset.digest == record.digest
        assert json.loads(inputs[name].dataset.profile)["num_images"] == record.num_images
    assert {t.value for d in inputs.values() for t in d.tags} == {"training", "validation"}

    encoder = _download(uri, run_id, "encoder", tmp_path)
    assert json.loads((encoder / "encoder.json").read_text())["arch"] == "small_resnet"
    logged = torch.load(encoder / "backbone.pt", weights_only=True)
    assert logged.keys() == served["backbone"].keys()
    assert all(torch.equal(logged[k], served["backbone"][k]) for k in logged)
    assert run.data.tags["mocoray.encoder_artifact"] == f"runs:/{run_id}/encoder"


def test_rerun_from_the_downloaded_config_reproduces_the_first_epoch_loss(served, tmp_path):
    c, run, uri = served["c"], served["run"], served["uri"]
    config = _download(uri, run.info.run_id, "config.yaml", tmp_path)
    assert main(["pretrain", str(config), "--set=run.name=rerun"]) == 0
    rerun = _runs(c, served["experiment"], "pretrain")[-1]
    assert rerun.info.run_name == "rerun"
    first = [m.value for m in c.get_metric_history(run.info.run_id, "loss") if m.step == 1]
    again = [m.value for m in c.get_metric_history(rerun.info.run_id, "loss") if m.step == 1]
    assert first == again and len(first) == 1
    assert rerun.data.params["run.seed"] == run.data.params["run.seed"]
    digests = [{d.dataset.name: d.dataset.digest for d in r.inputs.dataset_inputs} for r in (run, rerun)]
    assert digests[0] == digests[1]


@pytest.fixture(scope="module")
def linear_after_checkpoint_gone(served):
    """Delete the pretraining run's folder, then `linear-eval --pretrain-run ID`."""
    shutil.rmtree(served["run_dir"])
    run_id = served["run"].info.run_id
    argv = ["linear-eval", str(EXPERIMENTS / "linear_digits.yaml"), "--pretrain-run", run_id,
            *[f"--set={o}" for o in [*LINEAR_SET, "run.name=by-run-id", f"run.storage_path={served['tmp'] / 'runs'}",
                                     f"tracking.tracking_uri={served['uri']}"]]]
    rc = main(argv)
    return rc, _runs(served["c"], served["experiment"], "linear")


def test_linear_eval_by_run_id_works_after_the_checkpoint_folder_is_deleted(served, linear_after_checkpoint_gone,
                                                                          tmp_path):
    rc, linear_runs = linear_after_checkpoint_gone
    assert rc == 0
    (lin,) = linear_runs
    run_id = served["run"].info.run_id
    assert lin.info.status == "FINISHED"
    assert lin.data.tags["mocoray.checkpoint"] == f"runs:/{run_id}/encoder"
    assert lin.data.tags["mocoray.pretrain_run_id"] == run_id
    assert {"config.yaml", "command.txt", "environment.json"} <= {a.path for a in served["c"].list_artifacts(lin.info.run_id)}
    assert {d.dataset.name for d in lin.inputs.dataset_inputs} == {"synthetic/train", "synthetic/val"}

    out = tmp_path / "exported.pt"
    assert main(["export", "--pretrain-run", run_id, str(out), "--tracking-uri", served["uri"]]) == 0
    exported = torch.load(out, weights_only=True)
    assert all(torch.equal(exported[k], served["backbone"][k]) for k in served["backbone"])


def test_registered_champion_evaluates_the_same_weights(served, linear_after_checkpoint_gone, capsys):
    c, uri = served["c"], served["uri"]
    run_id = served["run"].info.run_id
    (by_run_id,) = linear_after_checkpoint_gone[1]
    name = f"enc-{served['tmp'].name}"
    assert main(["register", run_id, "--name", name, "--alias", "champion", "--tracking-uri", uri]) == 0
    version = c.get_model_version_by_alias(name, "champion")
    assert version.run_id == run_id and version.source == f"runs:/{run_id}/encoder"
    assert version.tags["linear_top1"] == f"{by_run_id.data.metrics['linear_top1_final']:.4f}"

    argv = ["linear-eval", str(EXPERIMENTS / "linear_digits.yaml"), "--checkpoint", f"models:/{name}@champion",
            *[f"--set={o}" for o in [*LINEAR_SET, "run.name=by-name", f"run.storage_path={served['tmp'] / 'runs'}",
                                     f"tracking.tracking_uri={uri}"]]]
    assert main(argv) == 0
    by_name = _runs(c, served["experiment"], "linear")[-1]
    assert by_name.data.tags["mocoray.checkpoint"] == f"models:/{name}/1"
    assert by_name.data.tags["mocoray.pretrain_run_id"] == run_id  # compare joins it to its pretraining run
    # same weights, same protocol and seed: the same fc, step for step
    assert by_name.data.metrics["linear_top1_final"] == by_run_id.data.metrics["linear_top1_final"]
    assert by_name.data.metrics["loss"] == by_run_id.data.metrics["loss"]

    capsys.readouterr()
    assert main(["compare", "--tracking-uri", uri, "--experiment", served["experiment"], "--csv"]) == 0
    rows = {r["run_id"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert rows[run_id]["registered"] == f"{name}/1" and rows[run_id]["alias"] == f"{name}@champion"
    assert [r["registered"] for rid, r in rows.items() if rid != run_id] == [""]  # the rerun is not registered
