"""What every Ray job shares: Ray start-up, worker set-up, run directories and status, trainer construction."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import storage
from ..config.common import RunConfig
from ..tracking import STATUS_TAG, end_run, safely

# The code uses Ray Train V2 (TrainController, Tune functions that fit their own trainer); Ray reads this
# flag when ray.train is first imported.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

_progress = logging.getLogger("mocoray.progress")

STATUS_FILE = "mocoray_status.json"  # how a job's rank 0 tells the driver how it ended


def console(message: str) -> None:
    """One line for the person watching the job (Ray forwards worker logs to the driver's console)."""
    _progress.info(message)


def quiet_ray_worker_logs() -> None:
    """Ray Train logs every report at INFO; our per-epoch line already says what matters."""
    _progress.setLevel(logging.INFO)
    try:
        from ray.train.v2._internal.execution import context  # its logger is named after its file

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: keep its logs
        pass


# ---------------------------------------------------------------------------------------------------
# Driver side


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_cluster_env(dashboard_port: int):
    """Environment for the processes of a local Ray being started: where its own API server is.

    Ray Train's placement-group cleaner (which frees the workers of a stopped Tune trial) finds its
    cluster by auto-detection, and that fails when several Ray instances share the host. Ray's
    processes inherit the environment at start-up; the caller's own environment is restored after.
    """
    key = "RAY_API_SERVER_ADDRESS"
    old = os.environ.get(key)
    os.environ[key] = f"http://127.0.0.1:{dashboard_port}"
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def init_ray(address: str | None = None) -> None:
    """Connect to `address`/$RAY_ADDRESS, or start a local Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        port = free_port()
        with local_cluster_env(port):
            ray.init(dashboard_host="127.0.0.1", dashboard_port=port)  # the dashboard cleans up stopped trials' resources


def prepare_run_dir(run_dir: str, name: str, resume: bool) -> str:
    """Check that the run is new (or, with `resume`, that it exists), create it, clear a stale status.

    A run name is a key: Ray Train continues whatever run it finds under the same name, so running a
    name again by accident would silently resume it. Returns the URL of the run's status file.
    """
    exists = storage.exists(run_dir)
    if exists and not resume:
        raise FileExistsError(f"run {name!r} already exists at {run_dir}; pass --resume to continue it, "
                              "or --set run.name=<new name> for a new run")
    if resume and not exists:
        raise FileNotFoundError(f"--resume: no run {name!r} at {run_dir} to continue")
    storage.makedirs(run_dir)
    status_url = storage.join(run_dir, STATUS_FILE)
    if storage.exists(status_url):  # a resumed run's old status says nothing about this attempt
        storage.remove(status_url)
    return status_url


def read_status(status_url: str) -> dict | None:
    return storage.read_json(status_url) if storage.exists(status_url) else None


@dataclass
class JobRun:
    """The driver's side of one Ray Train job: its folder, its status file and its MLflow run (if any)."""

    storage_path: str
    run_dir: str
    status_url: str
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None

    @classmethod
    def prepare(cls, run: RunConfig, resume: bool) -> JobRun:
        """The run's folder checked (new, or existing with `resume`) and created; see `prepare_run_dir`."""
        storage_path = storage.absolute(run.storage_path)
        run_dir = storage.join(storage_path, run.name)
        return cls(storage_path, run_dir, prepare_run_dir(run_dir, run.name, resume))

    def open_tracking(self, tracking_uri: str, open_run: Callable[..., str], *args) -> None:
        """`open_run(*args)` creates (or reopens) the MLflow run; if tracking is down, the job runs without."""
        self.mlflow_run_id = safely("start of the run", open_run, *args)
        self.tracking_uri = tracking_uri if self.mlflow_run_id else None

    def loop_config(self, **job_fields) -> dict:
        """What every worker loop gets besides its job's own fields."""
        return {"tracking_uri": self.tracking_uri, "mlflow_run_id": self.mlflow_run_id,
                "status_url": self.status_url, **job_fields}

    def status(self) -> dict | None:
        return read_status(self.status_url)

    def end_tracking(self, status: str, tags: dict[str, str]) -> None:
        if self.mlflow_run_id:
            safely("end of the run", end_run, self.tracking_uri, self.mlflow_run_id, status, tags)

    def fit(self, trainer, failed: type[Exception], what: str):
        """`trainer.fit()`; if it raises, the MLflow run ends FAILED and the error is raised as `failed`."""
        try:
            return trainer.fit()
        except Exception as err:
            self.end_tracking("FAILED", {STATUS_TAG: "failed"})
            raise failed(f"{what} failed: {err}") from err


def start_job(run: RunConfig, resume: bool, failed: type[Exception]) -> JobRun:
    """`JobRun.prepare`, with a name clash (or a missing run to resume) raised as the job's own `failed`."""
    try:
        return JobRun.prepare(run, resume)
    except (FileExistsError, FileNotFoundError) as err:
        raise failed(str(err)) from None


def make_torch_trainer(train_fn, loop_config: dict, run: RunConfig, storage_path: str, callbacks: list | None = None):
    """A TorchTrainer for `run`: workers, resources, storage, failures, checkpoints."""
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = {"CPU": run.cpus_per_worker}
    if run.use_gpu:
        resources["GPU"] = run.gpus_per_worker
    return TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.keep_checkpoints),
            callbacks=callbacks,
        ),
    )


def checkpoint_url(result, storage_path: str) -> str | None:
    """The final checkpoint of a Ray Train result as a path or URL the user can pass on."""
    if not result.checkpoint:
        return None
    path = result.checkpoint.path
    if "://" in storage_path:
        return path if "://" in path else storage_path.split("://", 1)[0] + "://" + path
    return path if path.startswith("/") else "/" + path


# ---------------------------------------------------------------------------------------------------
# Worker side


def worker_device(run: RunConfig) -> torch.device:
    """This worker's device, with its CPU threads set to the CPUs Ray gave it."""
    import ray.train.torch

    device = ray.train.torch.get_device() if run.use_gpu else torch.device("cpu")
    torch.set_num_threads(run.torch_threads or max(1, int(run.cpus_per_worker)))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def write_status(status_url: str, status: dict) -> None:
    storage.write_json(status_url, status)


def ddp_kwargs() -> dict:
    """DDP options for MoCo: no buffer broadcast on every forward.

    The queue (K x dim) and the key encoder are buffers/frozen; every rank keeps them identical by
    construction, so re-broadcasting them each step would only cost bandwidth. Parameters and buffers
    are still synced once at construction. torch >= 2.10 renamed the option.
    """
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
