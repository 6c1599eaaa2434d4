"""Resuming past damaged checkpoints: a truncated newest one is reported and the previous good one used (the MLflow
run told how many epochs are trained again); a run with no loadable checkpoint is a clear error, exit code 2.

One tiny trained run serves every case: the truncated-newest case resumes the run itself (its MLflow run is found
by the run's folder), the others damage copies of the folder (checkpoints are all they read).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import tiny_pretrain_overrides
from mocoray.checkpoints import checkpoint_problem, newest_good_checkpoint
from mocoray.cli import main
from mocoray.config import ConfigError, load_config
from mocoray.jobs.pretrain.driver import run_pretrain

# 128 images / batch 32 = 4 steps per epoch
TINY = {"model.arch": "small_resnet_slim", "data.image_size": 32, "optim.epochs": 3, "run.keep_checkpoints": 5,
        "optim.schedule": "constant"}


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory) -> Path:
    """The folder (runs/ + mlflow.db) of a finished 3-epoch run with checkpoints epoch_0001..3."""
    tmp = tmp_path_factory.mktemp("trained")
    res = run_pretrain(load_config(None, tiny_pretrain_overrides(tmp, "damaged", **TINY)))
    assert res.status == "completed"
    assert sorted(p.name for p in Path(res.run_dir).glob("epoch_*")) == ["epoch_0001", "epoch_0002", "epoch_0003"]
    return tmp


def _copy(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained run's folder under `tmp_path` (same run name)."""
    shutil.copytree(trained / "runs", tmp_path / "runs")
    return tmp_path / "runs" / "damaged"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_inside(path: Path) -> None:
    """Overwrite bytes in the middle of a file: its zip end record stays, so it still looks complete."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = b"\0" * len(data[middle : middle + 4096])
    path.write_bytes(bytes(data))


def test_a_file_damaged_inside_a_complete_looking_checkpoint_is_found(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    _garble_inside(run_dir / "epoch_0003" / "optimizer.pt")
    problem = checkpoint_problem(str(run_dir / "epoch_0003"))
    assert problem is not None and problem.startswith("optimizer.pt does not load")
    newest, damaged = newest_good_checkpoint(str(run_dir))
    assert newest == str(run_dir / "epoch_0002")
    assert damaged == [(str(run_dir / "epoch_0003"), problem)]


def test_resume_with_the_newest_checkpoint_truncated_continues_from_the_previous_one(trained, capsys):
    run_dir = trained / "runs" / "damaged"
    _truncate(run_dir / "epoch_0003" / "model.pt")
    client = mlflow.MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    (first,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    res = run_pretrain(load_config(None, tiny_pretrain_overrides(trained, "damaged", **TINY)), resume=True)
    assert f"checkpoint {run_dir / 'epoch_0003'} cannot be loaded (model.pt is truncated" in capsys.readouterr().err
    assert res.status == "completed" and res.metrics["epoch"] == 3
    # epoch 3 was trained again from epoch_0002, and its checkpoint written anew: whole, 12 steps in all
    assert checkpoint_problem(res.checkpoint) is None and Path(res.checkpoint).name == "epoch_0003"
    assert torch.load(Path(res.checkpoint) / "train_state.pt", weights_only=True)["global_step"] == 12
    run = client.get_run(res.mlflow_run_id)
    assert res.mlflow_run_id == first.info.run_id and run.info.status == "FINISHED"  # the same MLflow run, continued
    # the restart is at global step 8 (2 epochs done) and repeats 1 epoch
    repeated = [(m.step, m.value) for m in client.get_metric_history(res.mlflow_run_id, "epochs_repeated")]
    assert repeated == [(8, 1.0)]
    damaged = json.loads(run.data.tags["mocoray.damaged_checkpoints"])
    assert list(damaged) == [str(run_dir / "epoch_0003")] and "model.pt is truncated" in damaged[str(run_dir / "epoch_0003")]
    assert sorted(m.step for m in client.get_metric_history(res.mlflow_run_id, "loss")) == [1, 2, 3]  # none twice


def test_resume_with_every_checkpoint_damaged_is_a_clear_error_with_exit_code_2(trained, tmp_path, capsys):
    run_dir = _copy(trained, tmp_path)
    _truncate(run_dir / "epoch_0003" / "model.pt")
    _garble_inside(run_dir / "epoch_0002" / "model.pt")
    (run_dir / "epoch_0001" / "meta.json").write_text("{not json")
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    rc = main(["pretrain", "--resume", *[f"--set={o}" for o in tiny_pretrain_overrides(tmp_path, "damaged", **TINY)]])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert f"--resume: no checkpoint of {run_dir} can be loaded" in err and "Traceback" not in err
    assert f"{run_dir / 'epoch_0003'}: model.pt is truncated" in err
    assert f"{run_dir / 'epoch_0002'}: model.pt does not load" in err
    assert f"{run_dir / 'epoch_0001'}: meta.json is unreadable" in err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # nothing was started


def test_resume_from_a_damaged_checkpoint_is_refused_before_ray_starts(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    _garble_inside(run_dir / "epoch_0002" / "model.pt")
    cfg = load_config(None, tiny_pretrain_overrides(tmp_path, "from-damaged", **TINY))
    with pytest.raises(ConfigError, match=f"--resume-from: the checkpoint at {run_dir / 'epoch_0002'} cannot be "
                                          "loaded: model.pt does not load"):
        run_pretrain(cfg, resume_from=str(run_dir / "epoch_0002"))
    assert not (tmp_path / "runs" / "from-damaged").exists()
