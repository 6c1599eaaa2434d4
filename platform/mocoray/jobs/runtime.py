"""What every Ray job shares: Ray start-up, worker set-up, run directories and status, trainer construction."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import storage
from ..checkpoints import newest_complete_checkpoint
from ..config.common import ConfigError, RunConfig
from ..tracking.client import STATUS_TAG, end_run, release_run_key, safely
from . import interrupts
from .console import file_handler, log_to_driver, run_started, worker_sink
from .console import flush as flush_console

# The code uses Ray Train V2 (TrainController, Tune functions that fit their own trainer); Ray reads this
# flag when ray.train is first imported.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

_progress = logging.getLogger("mocoray.progress")
_sink: dict | None = None  # how this worker reaches the driver's terminal (jobs/console.py); None: Ray's log forwarding
MAILBOX_TIMEOUT_S = 10.0

STATUS_FILE = "mocoray_status.json"  # how a job's rank 0 tells the driver how it ended


def console(message: str) -> None:
    """One line for the person watching the job: through the driver's terminal if it gave one (the line
    arrives before the call returns, in order), else through Ray's forwarding of worker logs."""
    if _sink is not None:
        import ray

        try:
            ray.get(_sink["mailbox"].put.remote(("line", _sink["prefix"] + message)), timeout=MAILBOX_TIMEOUT_S)
            return
        except Exception:  # the driver (and its mailbox) is gone: the line still goes to this worker's log
            pass
    _progress.info(message)


def console_progress(progress: dict) -> bool:
    """Redraw the driver's progress bar (fire and forget: the next update redraws it anyway). False: the
    driver shows no bar (not a TTY, --verbose, or no terminal): print progress lines with `console`."""
    if _sink is None or not _sink["bar"]:
        return False
    _sink["mailbox"].put.remote(("progress", progress))
    return True


def start_worker_console(loop_config: dict, rank: int) -> None:
    """On every worker, at the start of a run: where `console` sends its lines, and Ray's and MLflow's log
    lines of this process written to the run's log file too. Ray Train logs every report at INFO; our
    per-epoch line already says what matters."""
    global _sink
    _sink = loop_config.get("console")
    _progress.setLevel(logging.INFO)
    if _sink and _sink.get("log_file"):
        file_handler(_sink["log_file"], tag=f"(rank {rank}) ", create_folder=False)
    try:
        from ray.train.v2._internal.execution import context  # its logger is named after its file

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: keep its logs
        pass


def fit(trainer):
    """`trainer.fit()`, interruptible (see `interrupts.fit`); when it returns or raises, the terminal shows
    every line the workers sent."""
    try:
        return interrupts.fit(trainer)
    finally:
        flush_console()


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


RAY_CONNECT_TIMEOUT_S = 15.0


def check_ray_address(address: str, where: str) -> None:
    """Fail within seconds, naming the address, when nothing accepts connections there: given an address
    that does not answer, ray.init retries the cluster's GCS for minutes, line after line."""
    if address in ("auto", "local"):  # Ray finds (or refuses) a local cluster by itself, quickly
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{where} {address}: expected host:port (a cluster's GCS), ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError(f"cannot reach a Ray cluster at {address} ({where}): {err.strerror or err}. Is the "
                          "cluster up (`ray start --head` on that host) and the port open? Nothing was started "
                          "or created.") from None


def init_ray(address: str | None = None) -> None:
    """Connect to `address`/$RAY_ADDRESS, or start a local Ray bound to 127.0.0.1. Workers' output is forwarded
    here only when the terminal is verbose (or not ours): see `console.log_to_driver`."""
    import ray

    if ray.is_initialized():
        return
    where = "--address" if address else "$RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_ray_address(address, where)
        ray.init(address=address, log_to_driver=log_to_driver())
    else:
        port = free_port()
        with local_cluster_env(port):
            ray.init(dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=log_to_driver())  # the dashboard cleans up stopped trials' resources


def run_dir_of(run: RunConfig) -> str:
    return storage.join(storage.absolute(run.storage_path), run.name)


def check_run_dir(run_dir: str, name: str, resume: bool) -> None:
    """The run must be new (or, with `resume`, exist). Reads only: the driver checks it before Ray starts.

    A run name is a key: Ray Train continues whatever run it finds under the same name, so running a
    name again by accident would silently resume it.
    """
    exists = storage.exists(run_dir)
    if exists and not resume:
        raise FileExistsError(f"run {name!r} already exists at {run_dir}; pass --resume to continue it, "
                              "or --set run.name=<new name> for a new run")
    if resume and not exists:
        raise FileNotFoundError(f"--resume: no run {name!r} at {run_dir} to continue")


def check_storage_path(storage_path: str) -> None:
    """A local `run.storage_path` must be (or be creatable as) a writable folder: no regular file on the way."""
    if "://" in storage_path:
        return
    path = Path(storage_path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"run.storage_path: {existing} is a file, not a folder (run.storage_path={storage_path})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.storage_path: {existing} is not writable (run.storage_path={storage_path})")


def prepare_run_dir(run_dir: str, name: str, resume: bool) -> str:
    """Check the run (see `check_run_dir`), create its folder, clear a stale status; returns the status file's URL."""
    check_run_dir(run_dir, name, resume)
    storage.makedirs(run_dir)
    status_url = storage.join(run_dir, STATUS_FILE)
    if storage.exists(status_url):  # a resumed run's old status says nothing about this attempt
        storage.remove(status_url)
    return status_url


def load_job_folder(path: str, file_name: str, model, what: str, failed: type[Exception]):
    """The resolved config a sweep or study saved in its folder, local or URL (what `--resume <folder>` continues),
    with its storage path set to the folder's parent: the folder may have moved since."""
    import yaml

    from ..config import build

    url = storage.join(storage.absolute(str(path)), file_name)
    if not storage.exists(url) or storage.is_dir(url):
        raise failed(f"--resume: {path} is not a {what} folder (no {file_name}); "
                     f"pass the folder printed when the {what} started: <storage_path>/<name>")
    config = build(model, yaml.safe_load(storage.read_bytes(url)))
    storage_path, name = url.rsplit("/", 2)[:2]
    if name != config.name:
        raise failed(f"--resume: the folder {path} is named {name!r} but holds {what} {config.name!r}; "
                     f"its runs are named after the {what}: rename the folder back")
    return config.model_copy(update={"storage_path": storage_path})


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
        run_dir = run_dir_of(run)
        job = cls(storage.absolute(run.storage_path), run_dir, prepare_run_dir(run_dir, run.name, resume))
        run_started(run_dir)
        return job

    def open_tracking(self, tracking_uri: str, open_run: Callable[..., str], *args) -> None:
        """`open_run(*args)` creates (or reopens) the MLflow run; if tracking is down, the job runs without."""
        self.mlflow_run_id = safely("start of the run", open_run, *args)
        self.tracking_uri = tracking_uri if self.mlflow_run_id else None

    def loop_config(self, **job_fields) -> dict:
        """What every worker loop gets besides its job's own fields."""
        return {"tracking_uri": self.tracking_uri, "mlflow_run_id": self.mlflow_run_id,
                "status_url": self.status_url, "console": worker_sink(self.run_dir), **job_fields}

    def status(self) -> dict | None:
        return read_status(self.status_url)

    def end_tracking(self, status: str, tags: dict[str, str], only_if_running: bool = False) -> None:
        if self.mlflow_run_id:
            safely("end of the run", end_run, self.tracking_uri, self.mlflow_run_id, status, tags,
                   only_if_running=only_if_running)

    def free_name_unless_checkpointed(self, resumed: bool) -> bool:
        """For a new run that ended before its first complete checkpoint: remove its folder and unlink its
        MLflow run from it, as there is nothing to resume and its name must not block running the same
        command again (the MLflow run stays, a record of what happened; the next one gets a new MLflow run).
        Returns whether it did."""
        if resumed or newest_complete_checkpoint(self.run_dir) is not None:
            return False
        storage.remove(self.run_dir, recursive=True)
        if self.mlflow_run_id:
            safely("release of the run name", release_run_key, self.tracking_uri, self.mlflow_run_id)
        return True

    def mark_interrupted(self, signal_name: str, tags: dict[str, str] | None = None) -> None:
        """Status file and MLflow run (KILLED, mocoray.status=interrupted) of a job stopped by a signal."""
        write_status(self.status_url, {"status": "interrupted", "signal": signal_name})
        self.end_tracking("KILLED", {STATUS_TAG: "interrupted", **(tags or {})})


def make_torch_trainer(train_fn, loop_config: dict, run: RunConfig, storage_path: str, callbacks: list | None = None,
                       resize_check_s: float | None = None, max_preemptions: int = -1, datasets: dict | None = None):
    """A TorchTrainer for `run`: workers, resources, storage, failures, checkpoints.

    `datasets`: Ray Datasets for the workers' `ray.train.get_dataset_shard`, each split across the workers into
    shards of equal row counts, served in order.
    A (min, max) `run.num_workers` makes it elastic, looking for more free workers every `resize_check_s`;
    restarts after node preemptions are counted apart from other failures (`max_preemptions`, -1: any).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = {"CPU": run.cpus_per_worker}
    if run.use_gpu:
        resources["GPU"] = run.gpus_per_worker
    elastic = {} if resize_check_s is None else {"elastic_resize_monitor_interval_s": resize_check_s}
    filesystem, path = storage.arrow_filesystem(storage_path)
    data = {}
    if datasets:
        # in order: with Ray Data's default (first finished, first served) which rows a rank gets would change
        # from one attempt to the next; in order, the split of an epoch's rows across ranks is the same in
        # every attempt with as many workers
        options = ray.train.DataConfig.default_ingest_options()
        options.preserve_order = True
        data = {"datasets": datasets, "dataset_config": ray.train.DataConfig(datasets_to_split=list(datasets),
                                                                             execution_options=options)}
    return TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        **data,
        scaling_config=ray.train.ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu,
                                               resources_per_worker=resources, **elastic),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures,
                                                   max_preemption_failures=max_preemptions),
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
