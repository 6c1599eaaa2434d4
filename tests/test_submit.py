"""`mocoray submit` against a real `ray start --head` cluster on 127.0.0.1 (job submission path)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from conftest import free_port, tiny_pretrain_overrides


@pytest.fixture
def ray_head(tmp_path):
    """A head node of our own, stopped by killing its process group: `ray stop` would stop every
    Ray on the machine, the session fixture's included."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    port, dash = free_port(), free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp = Path("/tmp") / f"rayhead{port}"  # short: Ray's socket paths have a length limit
    log = open(tmp_path / "ray_head.log", "w")
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
         "--temp-dir", str(temp), "--disable-usage-stats",
         # free ports: another local Ray (the session fixture's) may hold the defaults
         "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
         "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
         "--ray-client-server-port", str(free_port())],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 180
    while True:  # `ray start --block` does not return: wait for the dashboard to answer
        try:
            with urllib.request.urlopen(address + "/api/version", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError(f"ray head did not start: {(tmp_path / 'ray_head.log').read_text()[-2000:]}") from None
            time.sleep(1)
    try:
        yield address, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", str(temp)], capture_output=True)  # stragglers of this head only
        log.close()


def test_submitted_pretraining_job_runs_on_the_cluster_and_logs_to_mlflow(ray_head, tmp_path):
    address, env = ray_head
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "recipe.yaml").write_text("moco:\n  version: v2\n")
    overrides = tiny_pretrain_overrides(tmp_path, "submitted", **{"optim.epochs": 1, "run.cpus_per_worker": 0.5})
    cmd = [sys.executable, "-m", "mocoray.cli", "submit", "--address", address, "--working-dir", str(workdir),
           "--wait", "--", "pretrain", "recipe.yaml"]
    for o in overrides:
        cmd += ["--set", o]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "SUCCEEDED" in out.stdout
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tests")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["moco.version"] == "v2"
    assert (tmp_path / "runs" / "submitted" / "backbone.pt").exists()
