"""`mocoray ui`: MLflow's UI for the store the jobs write to, opened on an experiment's runs table.

MLflow 3.17's UI opens an experiment in its GenAI view (traces, token charts); the URL parameter
`workflowType=machine_learning` opens the model-training runs table instead (the experiment's
`mlflow.experimentKind` tag does not change that default: checked in Chromium).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .client import client, resolve_tracking_uri

RUNS_TABLE_QUERY = "workflowType=machine_learning"
START_TIMEOUT_S = 300  # a cold `mlflow server` on a busy 2-core machine takes a minute to answer


class UiError(RuntimeError):
    """The UI cannot be served (no store, unknown experiment, port taken, server did not start)."""


def store_path(uri: str) -> Path | None:
    """The local file or folder of a sqlite:/// or file:// store (None for a server)."""
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            return Path(uri[len(scheme):])
    return None


def experiment_url(base: str, experiment_id: str | None) -> str:
    """The address of experiment `experiment_id`'s runs table in the model-training view (the list without one)."""
    if experiment_id is None:
        return f"{base}/#/experiments?{RUNS_TABLE_QUERY}"
    return f"{base}/#/experiments/{experiment_id}?{RUNS_TABLE_QUERY}"


def pick_experiment(uri: str, name: str | None) -> str | None:
    """The id of experiment `name` (which must exist), else of the experiment with the newest run (None: no runs)."""
    c = client(uri)
    experiments = [e for e in c.search_experiments() if e.lifecycle_stage == "active"]
    if name is not None:
        for e in experiments:
            if e.name == name:
                return e.experiment_id
        names = ", ".join(sorted(e.name for e in experiments)) or "none"
        raise UiError(f"--experiment: no experiment {name!r} at {uri} (experiments there: {names})")
    if not experiments:
        return None
    newest = c.search_runs([e.experiment_id for e in experiments], max_results=1,
                           order_by=["attributes.start_time DESC"])
    return newest[0].info.experiment_id if newest else None


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise UiError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); pick another port") \
                from None


def server_command(uri: str, host: str, port: int) -> list[str]:
    """`mlflow server` on `uri`; a local store's new artifacts go where the jobs put theirs (beside the database)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
           "--port", str(port), "--workers", "1"]
    path = store_path(uri)
    if path is not None and uri.startswith("sqlite:///"):
        cmd += ["--artifacts-destination", str(path.parent / "mlartifacts")]
    return cmd


def wait_until_up(proc: subprocess.Popen, base: str, log: Path, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop(proc)
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise UiError(f"the MLflow server did not start (log {log}):\n{tail}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    """Stop the server and the workers it started (its own process group)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def serve(tracking_uri: str | None, host: str, port: int, experiment: str | None) -> int:
    """Serve the UI until Ctrl-C (or SIGTERM), printing the runs table's address; returns the exit code."""
    uri = resolve_tracking_uri(tracking_uri)
    path = store_path(uri)
    if path is None:  # an `mlflow server` serves its own UI
        base = uri.rstrip("/")
        print(f"{uri} is a tracking server: its UI is already there.\n{experiment_url(base, pick_experiment(uri, experiment))}")
        return 0
    if not path.exists():
        raise UiError(f"no MLflow store at {path} (from {uri}); run a job first, or pass --tracking-uri "
                      "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder)")
    experiment_id = pick_experiment(uri, experiment)
    check_port_free(host, port)
    log = path.parent / "mlflow-ui.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
                                                                               "false")}
    with open(log, "a") as out:
        proc = subprocess.Popen(server_command(uri, host, port), stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}"
    # Ctrl-C and SIGTERM both stop the server. SIGINT is set explicitly too: a process started in the background
    # by a non-interactive shell (a CI script, `cmd &` in a job) inherits SIGINT ignored, and Ctrl-C would be lost.
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"[mocoray] starting the MLflow UI for {uri} (server log: {log})", flush=True)
        wait_until_up(proc, base, log)
        print(f"MLflow UI: {experiment_url(base, experiment_id)}", flush=True)
        print("[mocoray] Ctrl-C stops it", flush=True)
        proc.wait()
        print(f"mocoray ui: the MLflow server stopped by itself (exit {proc.returncode}); its log: {log}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
