"""MLflow conventions: where runs go, what they are called, and tags that link downstream runs.

Only the driver creates and ends runs; rank 0 of a job logs metrics into the run the driver made
(so a restarted worker group keeps writing to the same run). Logging never kills training: when the
server is unreachable mid-run, training goes on and the metrics wait in an outbox (`tracking.outbox`).
Unreachable when a job starts is an error (`require_server`): better than days of untracked training.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .outbox import MetricRow, Outbox

log = logging.getLogger(__name__)

JOB_TAG = "mocoray.job"
PRETRAIN_RUN_TAG = "mocoray.pretrain_run_id"
CHECKPOINT_TAG = "mocoray.checkpoint"
RUN_KEY_TAG = "mocoray.run_key"
SWEEP_RUN_TAG = "mocoray.sweep_run_id"
STATUS_TAG = "mocoray.status"
BACKBONE_TAG = "mocoray.backbone"
ENCODER_TAG = "mocoray.encoder_artifact"  # runs:/<run id>/encoder once the exported backbone is logged
RUN_DIR_TAG = "mocoray.run_dir"
# JSON {field: value} of the config fields a `--resume` changed; MLflow params cannot change once logged
RESUMED_WITH_TAG = "mocoray.resumed_with"
MLFLOW_PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: nests child runs under their parent in the UI
# MLflow's own experiment kind; "custom_model_development" is the UI's "Machine learning" (model training) kind
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"
PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db; local paths made absolute.

    Absolute, because Ray workers run in their own scratch directories.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def _quick_failing_http() -> None:
    # MLflow retries an unreachable server for minutes by default; a training loop cannot wait that long.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def client(uri: str):
    import mlflow

    _quick_failing_http()
    return mlflow.MlflowClient(tracking_uri=uri)


def local_artifact_location(uri: str, experiment: str) -> str | None:
    """Beside the database file for a SQLite store (`<db folder>/mlartifacts/<experiment>`); None otherwise.

    MLflow's own default is ./mlruns of whatever directory first created the experiment: artifacts
    would scatter across working directories instead of staying with their store.
    """
    if not uri.startswith("sqlite:////"):
        return None
    return str(Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / quote(experiment, safe=""))


def experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=local_artifact_location(c.tracking_uri, name),
                               tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT})


def param_value(value: Any) -> str:
    text = "" if value is None else str(value)
    return text[:PARAM_VALUE_LIMIT]


def find_run(c, exp_id: str, run_key: str) -> str | None:
    runs = c.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
    return runs[0].info.run_id if runs else None


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    run_key: str | None = None,
) -> str:
    """Create a run (or reopen the one with the same `run_key`, for resumed jobs); returns its id."""
    from mlflow.entities import Param, RunTag

    c = client(uri)
    exp_id = experiment_id(c, experiment)
    run_id = find_run(c, exp_id, run_key) if run_key else None
    if run_id is None:
        all_tags = dict(tags)
        if run_key:
            all_tags[RUN_KEY_TAG] = run_key
        run_id = c.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
        items = [Param(k, param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            c.log_batch(run_id, params=items[i : i + 100])
    else:  # a resumed run keeps its Source (the command that started it)
        c.update_run(run_id, status="RUNNING")
        c.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items() if k != "mlflow.source.name"])
    return run_id


def release_run_key(uri: str, run_id: str) -> None:
    """Forget which run folder `run_id` belonged to: the next job with that folder starts a new MLflow run."""
    client(uri).delete_tag(run_id, RUN_KEY_TAG)


def last_logged_step(uri: str, run_id: str, key: str) -> int | None:
    """The highest step at which metric `key` was logged in `run_id` (None if never)."""
    steps = [m.step for m in client(uri).get_metric_history(run_id, key)]
    return max(steps) if steps else None


def effective_params(params: dict[str, str], tags: dict[str, str]) -> dict[str, str]:
    """A run's params with the values its resumes changed (tag `mocoray.resumed_with`) in place of the first."""
    changed = json.loads(tags.get(RESUMED_WITH_TAG) or "{}")
    return {**params, **{k: param_value(v) for k, v in changed.items()}}


def run_status(uri: str, run_id: str) -> str:
    """RUNNING, FINISHED, FAILED or KILLED."""
    return client(uri).get_run(run_id).info.status


def end_run(uri: str, run_id: str, status: str = "FINISHED", tags: dict[str, str] | None = None,
            only_if_running: bool = False) -> None:
    """End a run with `status` and `tags`; with `only_if_running`, leave a run that someone else has already
    ended as it is (a trial that Tune stopped is KILLED by the sweep while its own process may still fail)."""
    from mlflow.entities import RunTag

    c = client(uri)
    if only_if_running and run_status(uri, run_id) != "RUNNING":
        return
    if tags:
        c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    c.set_terminated(run_id, status=status)


def safely(what: str, fn, *args, **kwargs) -> Any:
    """Call a tracking function; on any failure (network, server, store) warn and return None.

    Tracking must never turn training or a finished evaluation into a failure.
    """
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        log.warning("MLflow %s failed: %s", what, first)
        print(f"[mocoray] warning: MLflow {what} failed: {first}")
        return None


class TrackingUnavailableError(RuntimeError):
    """The tracking server did not answer when the job started (the message names its URI)."""


def require_server(uri: str) -> None:
    """Fail fast, before any compute, when the tracking server at `uri` does not answer (a local store is
    not checked here: asking it would create it, and jobs create theirs only once Ray is reached)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as err:
        first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri} is unreachable ({first}). Start it, point tracking.tracking_uri "
            "(or $MLFLOW_TRACKING_URI) at one that runs, or set tracking.enabled=false to train without tracking."
        ) from None


class MetricLogger:
    """Rank 0's metric writer for an existing run; tracking-server failures are reported, not raised.

    With an `outbox_url`, values the server did not take are kept (in memory and in that file) and sent,
    oldest first, with the next call once the server answers again: see `tracking.outbox`.
    """

    def __init__(self, uri: str | None, run_id: str | None, outbox_url: str | None = None) -> None:
        self.uri, self.run_id = uri, run_id
        self._client = client(uri) if uri and run_id else None
        self.outbox = Outbox(outbox_url, run_id) if self._client is not None and outbox_url else None

    def _send(self, metrics: list[MetricRow], tags: dict[str, str]) -> None:
        from mlflow.entities import Metric, RunTag

        self._client.log_batch(self.run_id, metrics=[Metric(*row) for row in metrics],
                               tags=[RunTag(k, v) for k, v in tags.items()])

    def _log(self, what: str, metrics: list[MetricRow], tags: dict[str, str]) -> None:
        if self._client is None:
            return
        if self.outbox is None:
            safely(what, self._send, metrics, tags)
            return
        self.outbox.add(metrics, tags)
        safely(f"{what} ({len(self.outbox)} values waiting)", self.outbox.flush, self._send)

    def metrics(self, values: dict[str, float], step: int) -> None:
        import time

        now = int(time.time() * 1000)
        self._log("log_metrics", [(k, float(v), now, step) for k, v in values.items() if v is not None], {})

    def tags(self, values: dict[str, str]) -> None:
        self._log("set_tags", [], {k: str(v) for k, v in values.items()})

    def logged_steps(self, key: str) -> set[int] | None:
        """Steps of metric `key` the server has or the outbox holds; None when the server cannot say."""
        if self._client is None:
            return None
        history = safely("get_metric_history", self._client.get_metric_history, self.run_id, key)
        if history is None:
            return None
        pending = {row[3] for row in self.outbox.metrics if row[0] == key} if self.outbox is not None else set()
        return {m.step for m in history} | pending

    def flush(self) -> None:
        """Try again to send what is waiting."""
        self._log("send", [], {})

    def unsent(self) -> str | None:
        """The outbox file with what the server never took (written now), or None when all was sent."""
        return self.outbox.save() if self.outbox is not None else None


def run_lineage(uri: str, run_id: str) -> dict[str, Any]:
    """What a downstream job needs from an upstream run: its checkpoint tag, params, experiment, status."""
    c = client(uri)
    try:
        run = c.get_run(run_id)
    except Exception as err:
        raise LookupError(f"MLflow run {run_id!r} not found at {uri}: {str(err).splitlines()[0][:200]}") from None
    exp = c.get_experiment(run.info.experiment_id)
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "experiment": exp.name if exp else None,
        "job": run.data.tags.get(JOB_TAG),
        "checkpoint": run.data.tags.get(CHECKPOINT_TAG),
        "backbone": run.data.tags.get(BACKBONE_TAG),
        "encoder_artifact": run.data.tags.get(ENCODER_TAG),
        "params": effective_params(run.data.params, run.data.tags),
    }


def find_run_by_tag(uri: str, key: str, value: str) -> str | None:
    """Id of the newest run, in any active experiment, whose tag `key` equals `value` (None if none)."""
    c = client(uri)
    exp_ids = [e.experiment_id for e in c.search_experiments()]
    if not exp_ids:
        return None
    quoted = value.replace("'", "\\'")
    runs = c.search_runs(exp_ids, filter_string=f"tags.`{key}` = '{quoted}'", max_results=1,
                         order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None
