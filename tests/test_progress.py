"""What a pretraining run tells while it runs: progress inside an epoch, step-level metrics, a fair baseline."""

from __future__ import annotations

import re
import subprocess
import sys

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
    return {"cfg": cfg, "output": out.stdout + out.stderr, "client": c, "run": run}


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
