"""What a pretraining run tells while it runs: a quiet terminal with progress inside an epoch (a bar on a TTY,
lines otherwise), Ray's and MLflow's own lines in the run's log file, step-level metrics, a fair baseline."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import tiny_pretrain_overrides
from mocoray.config import load_config
from mocoray.config.pretrain import DEFAULT_RECIPE
from mocoray.core.shuffle_bn import resolve_bn_mode
from mocoray.data import build_pretrain_data
from mocoray.jobs.pretrain.loop import build_moco


@pytest.fixture(scope="module")
def chatty_run(ray_session, tmp_path_factory):
    """`mocoray pretrain`: 2 epochs of 4 steps, progress printed every step, step metrics logged every 2."""
    tmp = tmp_path_factory.mktemp("progress")
    overrides = tiny_pretrain_overrides(tmp, "chatty", **{"progress.print_every_steps": 1,
                                                          "progress.log_every_steps": 2})
    cmd = [sys.executable, "-m", "mocoray.cli", "pretrain", "--address",
           ray_session.get_runtime_context().gcs_address, *[f"--set={o}" for o in overrides]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    c = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    (run,) = c.search_runs([c.get_experiment_by_name("tests").experiment_id])
    cfg = load_config(DEFAULT_RECIPE, overrides)  # what the command ran (the embedded recipe, made tiny)
    return {"cfg": cfg, "output": out.stdout + out.stderr, "client": c, "run": run,
            "log": Path(cfg.run.storage_path) / cfg.run.name / "mocoray.log"}


def _run_on_a_pty(cmd: list[str]) -> tuple[int, str]:
    """`cmd` with a pseudo-terminal as its stdout and stderr (what a user's shell gives it); all it wrote."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, close_fds=True)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the pty's other end closed: the command and everything it started are done writing
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def tty_run(ray_session, tmp_path_factory):
    """The same tiny `mocoray pretrain` with its output on a pseudo-terminal, at the default progress settings."""
    tmp = tmp_path_factory.mktemp("progress_tty")
    overrides = tiny_pretrain_overrides(tmp, "on-a-tty")
    rc, output = _run_on_a_pty([sys.executable, "-m", "mocoray.cli", "pretrain", "--address",
                                ray_session.get_runtime_context().gcs_address, *[f"--set={o}" for o in overrides]])
    assert rc == 0, output[-3000:]
    return output


# Ray's and MLflow's log lines (levels), Python warnings, lines Ray forwards from its processes (prefixed)
RAY_OR_MLFLOW_LINE = re.compile(r"WARNING|INFO|Warning:|\((RayTrainWorker|TrainController|pid=)|core_worker")


def test_the_terminal_shows_our_lines_only_and_the_log_file_holds_the_rest(chatty_run):
    """Not a TTY (CI, piped output): no Ray or MLflow line, no per-worker prefix, at most one checkpoint mention
    per epoch; what Ray said (the workers' checkpoint messages among it) is in <run dir>/mocoray.log."""
    output = chatty_run["output"]
    noise = [line for line in output.splitlines() if RAY_OR_MLFLOW_LINE.search(line)]
    assert not noise, output[-3000:]
    assert "\r" not in output and "\x1b[" not in output  # no bar drawn where nobody watches it redraw
    assert len(re.findall("checkpoint", output, re.IGNORECASE)) <= 2, output
    assert re.search(r"^epoch 2/2  loss \d", output, re.MULTILINE), output[-3000:]
    assert "kNN top-1 at init" in output and "MLflow run:" in output
    log = chatty_run["log"].read_text()
    assert "Checkpoint successfully created" in log and "(rank 0)" in log, log[-3000:]


def test_on_a_tty_a_progress_bar_is_redrawn_in_place_within_each_epoch(tty_run):
    bars = re.findall(r"\repoch (\d)/2 \[[#-]{24}\] (\d)/4  loss \d+\.\d{4}  \d+ pairs/s  ETA \d+:\d\d\x1b\[K", tty_run)
    assert {epoch for epoch, _ in bars} == {"1", "2"}, tty_run[-3000:]
    assert ("1", "4") in bars and ("2", "4") in bars  # the last step of each epoch is always drawn
    lines = tty_run.replace("\r\n", "\n").replace("\x1b[K", "").split("\n")
    epoch_lines = [line.rsplit("\r", 1)[-1] for line in lines if "loss" in line and "acc" in line]
    assert [line.split()[1] for line in epoch_lines] == ["1/2", "2/2"], tty_run[-3000:]  # the bar gave way to them
    assert not [line for line in lines if RAY_OR_MLFLOW_LINE.search(line)], tty_run[-3000:]


def _history(chatty_run, key: str) -> dict[int, float]:
    return {m.step: m.value for m in chatty_run["client"].get_metric_history(chatty_run["run"].info.run_id, key)}


def test_progress_inside_an_epoch_shows_step_loss_throughput_and_eta(chatty_run):
    lines = [line for line in chatty_run["output"].splitlines() if re.search(r"epoch \d/2 +step \d/4", line)]
    assert len(lines) == 8, chatty_run["output"][-3000:]  # every step of both epochs
    assert re.search(r"epoch 1/2 +step 2/4 +loss \d+\.\d{4} +\d+ pairs/s +ETA \d+:\d\d", lines[1]), lines[1]


def test_step_metrics_go_to_mlflow_at_their_interval_and_epoch_metrics_stay(chatty_run):
    step_loss = _history(chatty_run, "step_loss")
    assert sorted(step_loss) == [2, 4, 6, 8]  # global steps
    assert sorted(_history(chatty_run, "step_lr")) == [2, 4, 6, 8]
    assert all(v > 0 for v in _history(chatty_run, "step_pairs_per_s").values())
    epoch_loss = _history(chatty_run, "loss")
    assert sorted(epoch_loss) == [1, 2]
    # a step metric is the mean loss since the previous one, so two of them make the epoch's mean
    assert epoch_loss[1] == pytest.approx((step_loss[2] + step_loss[4]) / 2, rel=1e-5)


def test_knn_baseline_at_init_uses_statistics_recomputed_on_training_images(chatty_run):
    """Step 0's kNN is the same random-init encoder, evaluated after its BN statistics were recomputed
    on training images (at their init values of 0 and 1 it would be degenerate)."""
    from mocoray.jobs.pretrain.monitor import knn_at_init

    cfg = chatty_run["cfg"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the run's worker (run.cpus_per_worker=1): the same float sums
    torch.manual_seed(cfg.run.seed)  # the job's initial model
    model = build_moco(cfg, resolve_bn_mode(cfg.moco.bn_mode, 1, "cpu"))
    data = build_pretrain_data(cfg.data)
    try:
        expected, _ = knn_at_init(model.encoder_q.backbone, data, cfg, torch.device("cpu"), False)
    finally:
        torch.set_num_threads(threads)
    assert _history(chatty_run, "knn_top1_init")[0] == pytest.approx(expected, abs=1e-6)


def test_a_command_gives_the_terminal_and_the_loggers_back_when_it_ends(tmp_path, capsys):
    """`main` owns the terminal only while its command runs: a caller in the same process (a test, a notebook)
    gets Ray's and MLflow's loggers back as they were, and later jobs print through Ray as before."""
    import logging
    import warnings

    import mlflow  # noqa: F401  (Ray and MLflow set their loggers up when imported: compare with that state)
    import ray  # noqa: F401

    from mocoray.cli import main
    from mocoray.jobs import console

    ray_logger = logging.getLogger("ray")
    before = (ray_logger.propagate, list(ray_logger.handlers), [h.level for h in ray_logger.handlers])
    missing = tmp_path / "no-such-folder"
    # the command takes the terminal, then refuses the missing dataset before Ray starts
    rc = main(["pretrain", "--set", "data.name=imagefolder", "--set", f"data.root={missing}",
               "--set", f"run.storage_path={tmp_path / 'runs'}", "--set", "tracking.enabled=false"])
    assert rc == 2 and str(missing) in capsys.readouterr().err
    assert console._terminal is None and console.log_to_driver()
    assert (ray_logger.propagate, list(ray_logger.handlers), [h.level for h in ray_logger.handlers]) == before
    with warnings.catch_warnings(record=True) as caught:  # Python warnings are warnings again, not log records
        warnings.simplefilter("always")
        warnings.warn("still a warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["still a warning"]
