"""Tracking outages without Ray: the outbox that keeps what the MLflow server did not take, and the start check."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from conftest import free_port, tiny_pretrain_overrides
from mocoray.config import load_config
from mocoray.jobs.pretrain.driver import PretrainFailed, close_tracking, run_pretrain
from mocoray.jobs.runtime import JobRun
from mocoray.tracking.client import MetricLogger, start_run
from mocoray.tracking.outbox import UNSENT_FILE, describe


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


def test_what_a_worker_could_not_send_is_sent_in_order_by_its_successor_once_the_server_answers(
        mlflow_server, tmp_path):
    run_id = start_run(mlflow_server, "outage", "run", {"a": 1}, {})
    outbox = str(tmp_path / "run" / UNSENT_FILE)
    MetricLogger(mlflow_server, run_id, outbox).metrics({"loss": 1.0}, step=1)
    assert not Path(outbox).exists()  # sent at once: nothing waits

    # the server does not answer this worker (here: the URI of one that is gone)
    cut_off = MetricLogger(f"http://127.0.0.1:{free_port()}", run_id, outbox)
    cut_off.metrics({"loss": 0.9, "lr": 0.1}, step=2)
    cut_off.tags({"mocoray.world_size": 2})
    assert describe(outbox) == {"run_id": run_id, "metrics": 2, "tags": 1, "steps": {"loss": [2], "lr": [2]}}

    # that worker is gone (preempted); its successor finds what it kept, and the server answers again
    successor = MetricLogger(mlflow_server, run_id, outbox)
    successor.metrics({"loss": 0.8}, step=3)
    assert _history(mlflow_server, run_id, "loss") == [(1, 1.0), (2, 0.9), (3, 0.8)]
    assert _history(mlflow_server, run_id, "lr") == [(2, 0.1)]
    assert mlflow.MlflowClient(mlflow_server).get_run(run_id).data.tags["mocoray.world_size"] == "2"
    assert not Path(outbox).exists() and successor.unsent() is None


def test_what_the_server_never_takes_is_left_in_the_file_that_unsent_names(tmp_path):
    uri = f"http://user:secret-token@127.0.0.1:{free_port()}"  # a server that went away for good
    outbox = str(tmp_path / UNSENT_FILE)
    logger = MetricLogger(uri, "0123abcd", outbox)
    for epoch in (1, 2):
        logger.metrics({"loss": 1.0 / epoch}, step=epoch)
    assert logger.unsent() == outbox
    assert describe(outbox) == {"run_id": "0123abcd", "metrics": 2, "tags": 0, "steps": {"loss": [1, 2]}}
    text = Path(outbox).read_text()
    assert "secret-token" not in text and "127.0.0.1" not in text  # values only: never where, or as whom, to send


def test_a_tracking_server_unreachable_at_start_stops_the_job_before_any_compute(tmp_path, monkeypatch):
    from mocoray.jobs import runtime

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = load_config(None, tiny_pretrain_overrides(tmp_path, "no-server", **{"tracking.tracking_uri": uri}))

    def no_ray(address=None):
        raise AssertionError("Ray was started although the tracking server is unreachable")

    monkeypatch.setattr(runtime, "init_ray", no_ray)
    with pytest.raises(PretrainFailed, match=f"MLflow tracking server {uri} is unreachable.*tracking.enabled=false"):
        run_pretrain(cfg)
    assert not (tmp_path / "runs" / "no-server").exists()  # no run folder, no Ray job


def test_the_driver_adds_the_final_tags_to_what_is_still_unsent_and_names_the_file(tmp_path):
    gone = f"http://127.0.0.1:{free_port()}"
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    MetricLogger(gone, "0123abcd", str(run_dir / UNSENT_FILE)).metrics({"loss": 0.5}, step=3)  # a worker's leftover
    job = JobRun(str(tmp_path / "runs"), str(run_dir), str(run_dir / "status.json"), gone, "0123abcd")
    unsent = close_tracking(job, "FINISHED", {"mocoray.status": "completed"})
    assert unsent == str(run_dir / UNSENT_FILE)
    assert describe(unsent) == {"run_id": "0123abcd", "metrics": 1, "tags": 1, "steps": {"loss": [3]}}
