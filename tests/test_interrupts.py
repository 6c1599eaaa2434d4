"""Interrupted, failed and resumed runs leave nothing in a wrong state: real signals to real driver processes.

The drivers run as subprocesses connected to the session's Ray (`--address`), so a signal stops their
Ray job without touching the Ray the other tests share.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import tiny_pretrain_overrides
from mocoray.config import ConfigError, load_config
from mocoray.jobs import interrupts
from mocoray.jobs.faults import Faults
from mocoray.jobs.pretrain.driver import PretrainFailed, run_pretrain
from mocoray.tracking.compare import compare_table


def _gcs_address(ray_session) -> str:
    return ray_session.get_runtime_context().gcs_address


def _client(tmp_path: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _runs(tmp_path: Path) -> list:
    c = _client(tmp_path)
    exp = c.get_experiment_by_name("tests")
    return c.search_runs([exp.experiment_id]) if exp else []


def _steps(tmp_path: Path, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in _client(tmp_path).get_metric_history(run_id, key))


def _wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver ended (rc {proc.returncode}) before {what}:\n"
                                 + (log.read_text()[-3000:] if log else ""))
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n" + (log.read_text()[-3000:] if log else ""))
        time.sleep(0.1)


def _start_cli(tmp_path: Path, ray_session, name: str, log: Path, **overrides) -> subprocess.Popen:
    """`mocoray pretrain` (the embedded recipe, made tiny) as its own driver process."""
    overrides = {"run.checkpoint_every": 1, **overrides}
    cmd = [sys.executable, "-m", "mocoray.cli", "pretrain", "--address", _gcs_address(ray_session),
           *[f"--set={o}" for o in tiny_pretrain_overrides(tmp_path, name, **overrides)]]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 90) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the driver did not exit after the signal:\n" + log.read_text()[-3000:]) from None
    return proc.returncode, log.read_text()


def test_a_signal_leaves_the_fit_thread_running_until_ray_is_stopped_and_then_waits_for_it(monkeypatch):
    """The driver waits for trainer.fit() on a helper thread; a signal raises on the main thread. The helper
    must still count as running (Python 3.11's Thread.join, interrupted by a signal, marks it stopped), and
    stopping Ray waits for it to end, so the process never exits with it inside Ray (a SIGSEGV at exit)."""
    import ray

    release = threading.Event()

    class BlockedTrainer:
        def fit(self):
            release.wait(30)
            return "ended"

    def sigint_soon() -> None:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=sigint_soon).start()
    with interrupts.signals_raise(), pytest.raises(interrupts.JobInterrupted):
        interrupts.fit(BlockedTrainer())
    (fit_thread,) = [t for t in threading.enumerate() if t.name == "mocoray-fit"]
    assert fit_thread.is_alive()

    def shutdown() -> None:  # not the shared session's Ray: the disconnect is what ends the fit thread
        threading.Timer(0.5, release.set).start()

    monkeypatch.setattr(ray, "shutdown", shutdown)
    interrupts.stop_ray(wait_s=60)
    # it returned once the fit thread had ended, and the thread ended because Ray's shutdown released it
    assert release.is_set() and not fit_thread.is_alive()


def test_sigterm_before_the_first_checkpoint_leaves_no_run_behind(ray_session, tmp_path):
    log = tmp_path / "driver.log"
    proc = _start_cli(tmp_path, ray_session, "early-term", log, **{"optim.epochs": 100})
    _wait_for(lambda: "kNN top-1 at init" in log.read_text(), 300, "training to start", proc, log)
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc, log)
    assert rc == 143, out[-3000:]
    assert "interrupted (SIGTERM)" in out and "No checkpoint was written" in out
    assert not (tmp_path / "runs" / "early-term").exists()  # the name is free for the same command again
    (run,) = _runs(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["mocoray.status"] == "interrupted"


_INTERRUPTED_DRIVER = """
import sys
from mocoray.cli import main
from mocoray.jobs.faults import Faults
from mocoray.jobs.pretrain import driver
run_pretrain = driver.run_pretrain  # `mocoray pretrain` as a user runs it, with the interrupt injected
driver.run_pretrain = lambda cfg, **kw: run_pretrain(cfg, faults=Faults(interrupt_driver_after_epoch=2), **kw)
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def interrupted_then_resumed(ray_session, tmp_path_factory):
    """`mocoray pretrain` for 3 epochs (its own driver process), SIGINT to that driver right after epoch 2's
    checkpoint is reported, then `--resume` with optim.epochs=4. The controller's poll interval is raised to
    10 s, so the interrupt lands (as it can in real runs) while epoch_0002 is on disk but not yet registered
    with Ray's controller. What the interrupted run left (its MLflow run, its checkpoints, and those 5 s
    later) is recorded before the resume reopens the run."""
    tmp = tmp_path_factory.mktemp("interrupted")
    log = tmp / "driver.log"
    run_dir = tmp / "runs" / "resumable"
    overrides = tiny_pretrain_overrides(tmp, "resumable", **{"optim.epochs": 3, "optim.schedule": "constant",
                                                             "run.keep_checkpoints": 5})
    recipe = tmp / "schema_defaults.yaml"  # no fields: the schema's defaults, what the resume's load_config(None) has
    recipe.write_text("{}\n")
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "10"}
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_DRIVER, "pretrain", str(recipe), "--address",
                             _gcs_address(ray_session), *[f"--set={o}" for o in overrides]],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, env=env)
    rc, out = _finish(proc, log, timeout=180)
    assert "interrupted (SIGINT)" in out, out[-3000:]  # the injected interrupt happened
    checkpoints = sorted(p.name for p in run_dir.glob("epoch_*"))
    (interrupted_run,) = _runs(tmp)
    time.sleep(5)  # the Ray job is stopped: no worker writes epoch 3's checkpoint (or any other)
    checkpoints_later = sorted(p.name for p in run_dir.glob("epoch_*"))
    resumed = run_pretrain(load_config(None, tiny_pretrain_overrides(
        tmp, "resumable", **{"optim.epochs": 4, "optim.schedule": "constant", "run.keep_checkpoints": 5})),
        resume=True)
    return {"tmp": tmp, "rc": rc, "out": out, "resumed": resumed, "overrides": overrides,
            "interrupted_run": interrupted_run, "checkpoints": checkpoints, "checkpoints_later": checkpoints_later}


def test_sigint_stops_the_job_marks_the_run_killed_and_says_how_to_resume(interrupted_then_resumed):
    rc, out = interrupted_then_resumed["rc"], interrupted_then_resumed["out"]
    assert rc == 130, out[-3000:]
    assert "interrupted (SIGINT)" in out and "--resume" in out
    checkpoints = interrupted_then_resumed["checkpoints"]
    run = interrupted_then_resumed["interrupted_run"]
    assert run.info.status == "KILLED" and run.data.tags["mocoray.status"] == "interrupted"
    newest = run.data.tags["mocoray.checkpoint"]
    assert Path(newest).name in checkpoints and newest in out
    assert interrupted_then_resumed["checkpoints_later"] == checkpoints


def test_resume_after_an_interrupt_starts_from_the_newest_checkpoint_and_logs_no_epoch_twice(
        interrupted_then_resumed):
    tmp, res = interrupted_then_resumed["tmp"], interrupted_then_resumed["resumed"]
    assert res.status == "completed" and res.metrics["epoch"] == 4
    for key in ("loss", "lr"):
        assert _steps(tmp, res.mlflow_run_id, key) == [1, 2, 3, 4], key
    assert _steps(tmp, res.mlflow_run_id, "knn_top1") == [0, 1, 2, 3, 4]
    state = torch.load(Path(res.checkpoint) / "train_state.pt", weights_only=True)
    assert state["epoch"] == 4 and state["global_step"] == 16  # 4 steps per epoch, none repeated
    assert interrupted_then_resumed["rc"] == 130
    assert "The newest complete checkpoint is" in interrupted_then_resumed["out"]


def test_resume_with_more_epochs_records_the_change_where_compare_sees_it(interrupted_then_resumed):
    tmp, res = interrupted_then_resumed["tmp"], interrupted_then_resumed["resumed"]
    run = _client(tmp).get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert json.loads(run.data.tags["mocoray.resumed_with"]) == {"optim.epochs": 4}
    (row,) = compare_table(f"sqlite:///{tmp / 'mlflow.db'}", "tests").rows
    assert row["epochs"] == 4


def test_resume_refuses_changes_to_the_state_before_touching_the_run(interrupted_then_resumed):
    tmp, res = interrupted_then_resumed["tmp"], interrupted_then_resumed["resumed"]
    base = {"optim.schedule": "constant", "run.keep_checkpoints": 5}
    for change, message in ((({"moco.queue_size": 128, "optim.epochs": 5}),
                             r"--resume cannot change moco.queue_size \(64 -> 128\)"),
                            ({"model.arch": "resnet18"}, r"--resume cannot change model.arch"),
                            ({"optim.epochs": 2}, r"optim.epochs=2 is below the 4 epochs the run has completed")):
        cfg = load_config(None, tiny_pretrain_overrides(tmp, "resumable", **{"optim.epochs": 4, **base, **change}))
        with pytest.raises(ConfigError, match=message):
            run_pretrain(cfg, resume=True)
    run = _client(tmp).get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mocoray.status"] == "completed"


def test_a_run_that_fails_before_its_first_checkpoint_leaves_its_name_free(ray_session, tmp_path):
    cfg = load_config(None, tiny_pretrain_overrides(tmp_path, "fragile", **{"optim.epochs": 1}))
    with pytest.raises(PretrainFailed, match="non-finite loss at epoch 1"):
        run_pretrain(cfg, faults=Faults(nan_at_step=1))
    assert not (tmp_path / "runs" / "fragile").exists()
    again = run_pretrain(cfg)  # the same name, the input fixed: a new run, not "already exists"
    assert again.status == "completed"
    runs = {r.info.run_id: r for r in _runs(tmp_path)}
    assert len(runs) == 2 and runs[again.mlflow_run_id].info.status == "FINISHED"
    (failed,) = [r for rid, r in runs.items() if rid != again.mlflow_run_id]
    assert failed.info.status == "FAILED" and failed.data.tags["mocoray.status"] == "nonfinite_loss"
