"""Shared, real services for the tests: one local Ray session and one `mlflow server` on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a test-local cluster; no token file needed
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's controller looks at its workers every 2 s by default: each run's end (and each restart) waits
# for that look. 0.5 s saves a second or two per Ray Train run, of which the suite starts dozens.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# Encoders downloaded from tracking servers (set before Ray starts, so its workers share it).
os.environ.setdefault("MOCORAY_CACHE_DIR", tempfile.mkdtemp(prefix="mocoray-test-cache-"))

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
# Logical CPUs for the shared Ray session. The machine has 2 cores; Ray only counts slots, and a
# sweep of 2 concurrent trials needs a driver slot per trial beside its workers.
RAY_TEST_CPUS = 4


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free now and never handed out before in this test process.

    The OS may hand the same just-released port to two consecutive binds; a Ray node given that port for
    two of its components refuses to start ("port ... used by other components"), as it did once in CI.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (start-up is ~20 s; per-test clusters would dominate)."""
    import ray

    if not ray.is_initialized():
        from mocoray.jobs.runtime import local_cluster_env

        port = free_port()  # pinned, so Ray's processes know their own API server (see local_cluster_env)
        with local_cluster_env(port):
            ray.init(num_cpus=RAY_TEST_CPUS, include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=port, log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def _mlflow_store_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with its tables made: creating them takes ~2.5 s, once per fresh file."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _mlflow_store_ready(request, _mlflow_store_template) -> None:
    """Tests keep their store at tmp_path/mlflow.db; start it as a copy of the template instead of paying
    MLflow's table creation in every test. Tests marked `no_mlflow_store` check that nothing is created."""
    if "tmp_path" not in request.fixturenames or request.node.get_closest_marker("no_mlflow_store"):
        return
    target = request.getfixturevalue("tmp_path") / "mlflow.db"
    if not target.exists():
        shutil.copyfile(_mlflow_store_template, target)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a SQLite store under `root`; stop() and start() it again at will
    (same port, same store: what a tracking-server restart looks like to its clients)."""

    def __init__(self, root: Path, job_execution: bool = True) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ)
        if not job_execution:  # MLflow's background job runner: ten more processes nothing here needs
            self.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        exe = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [exe, "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=self.env, start_new_session=True,
        )
        log.close()
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the server and the workers it started (its own process group)."""
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite store; yields its http:// URI."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    yield server.uri
    server.stop()


def tiny_pretrain_overrides(tmp_path: Path, name: str = "tiny", **extra) -> list[str]:
    """--set overrides for a seconds-long pretraining run on synthetic data (plumbing tests)."""
    items = {
        "model.arch": "small_resnet",
        "moco.queue_size": 64,
        "moco.momentum": 0.99,
        "moco.temperature": 0.2,
        "moco.num_splits": 2,
        "data.name": "synthetic",
        "data.synthetic_images": 128,
        "data.synthetic_classes": 4,
        "data.image_size": 16,
        "optim.batch_size": 32,
        "optim.epochs": 2,
        "optim.lr": 0.03,
        "run.name": name,
        "run.num_workers": 1,
        "run.storage_path": str(tmp_path / "runs"),
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment": "tests",
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


# MoCo v3 at the tiny size: no queue, BN MLP heads (synchronised across workers), a predictor, AdamW.
V3_TINY = {"moco.version": 3, "moco.hidden_dim": 64, "moco.dim": 32, "optim.optimizer": "adamw", "optim.lr": 1e-3,
           "optim.weight_decay": 0.1}


def tiny_v3_overrides(tmp_path: Path, name: str = "tiny-v3", **extra) -> list[str]:
    """`tiny_pretrain_overrides` for MoCo v3 (V3_TINY), without the queue fields v3 refuses."""
    queue_fields = ("moco.queue_size=", "moco.num_splits=")
    return [o for o in tiny_pretrain_overrides(tmp_path, name, **{**V3_TINY, **extra})
            if not o.startswith(queue_fields)]


def wait_until(predicate: Callable[[], bool], timeout_s: float, message: str | Callable[[], str]) -> None:
    """Poll `predicate` until it holds; fail with `message` (a string, or a function for one read at the time,
    such as a log's tail) if it still does not after `timeout_s`. A guard against a hang, not a measurement:
    give it a generous timeout."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(message() if callable(message) else message)
        time.sleep(0.1)


@pytest.fixture
def one_torch_thread():
    """One torch thread, as a 1-CPU Ray worker runs: on the shared 2-core machine a second thread
    mostly waits for a core (several times slower under load)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_sweep_overrides(tmp_path: Path, name: str, **extra: str) -> list[str]:
    """The tiny digits sweep made faster still: 256 images, 3 epochs, results under tmp_path."""
    items = {
        "name": name,
        "storage_path": str(tmp_path / "sweeps"),
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment": "sweep-tests",
        "data.max_images": "256",
        "knn.max_bank": "256",
        "optim.batch_size": "32",
        "optim.epochs": "3",
        "run.storage_path": str(tmp_path / "runs"),
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="session")
def k_m_tau_sweep(ray_session, tmp_path_factory):
    """One real sweep over K, m, tau on CPU (4 trials, ASHA), then the linear evaluation of its best trial, as
    `mocoray sweep experiments/sweep_digits_tiny.yaml --then-linear-eval 1 --linear-recipe
    experiments/linear_digits.yaml` runs them; shared by the sweep's tests and the MLflow UI's.

    Ranked by the InfoNCE loss, which grows with log K: the two K=512 trials start after the K=16 ones
    have recorded epoch 1 and always fall below ASHA's cutoff there (a tau range this narrow cannot make
    up the gap), so at least two trials are stopped early, whatever the timing."""
    from mocoray.config import load_sweep_config
    from mocoray.jobs.linear.driver import linear_eval_best
    from mocoray.jobs.sweep import run_sweep
    from mocoray.tracking.describe import set_recipes

    tmp = tmp_path_factory.mktemp("k-m-tau")
    tiny, linear_recipe = EXPERIMENTS / "sweep_digits_tiny.yaml", EXPERIMENTS / "linear_digits.yaml"
    sweep = load_sweep_config(tiny, tiny_sweep_overrides(tmp, "k-m-tau", metric="loss", mode="min", **{
        "space.moco.queue_size": "{grid: [16, 512]}",
        "space.moco.temperature": "{loguniform: [0.15, 0.25]}",
    }))
    set_recipes(sweep=str(tiny), linear=str(linear_recipe))  # what `mocoray sweep` records
    try:
        res = run_sweep(sweep)
        linear = linear_eval_best(res, sweep, 1, str(linear_recipe), [
            "optim.epochs=1", "data.max_images=256", f"run.storage_path={tmp / 'runs'}"])
    finally:
        set_recipes()
    return {"res": res, "sweep": sweep, "linear": linear, "tmp": tmp}


def recorded_batches(folder: Path) -> dict[tuple[int, int], dict[int, list[int]]]:
    """{(epoch, step): {rank: sample ids}} from the `Faults.batches_dir` records (one rank<r>.jsonl per rank)."""
    steps: dict[tuple[int, int], dict[int, list[int]]] = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            steps.setdefault((rec["epoch"], rec["step"]), {})[rec["rank"]] = rec["keys"]
    return steps
