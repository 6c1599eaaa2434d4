"""Metrics and tags the tracking server has not acknowledged yet, kept in a file until they are sent.

While the MLflow server is unreachable, rank 0 keeps logging into the outbox; every later log call
first tries to send what is waiting, oldest first. The outbox lives in a JSON file next to the run's
checkpoints, so what a preempted worker could not send survives it: the restarted worker, or the
driver at the end of the job, sends it. The file holds the run id and the values, never the tracking
URI or any credential.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import storage

UNSENT_FILE = "mlflow_unsent.json"
BATCH_METRICS = 1000  # MLflow's log_batch limits
BATCH_TAGS = 100

# (key, value, timestamp in ms, step)
MetricRow = tuple[str, float, int, int]
Send = Callable[[list[MetricRow], dict[str, str]], None]


class Outbox:
    """Pending metrics and tags for one MLflow run, mirrored to `url` whenever some are left unsent."""

    def __init__(self, url: str, run_id: str) -> None:
        self.url, self.run_id = url, run_id
        self.metrics: list[MetricRow] = []
        self.tags: dict[str, str] = {}
        self._on_disk = storage.exists(url)
        if self._on_disk:
            saved = storage.read_json(url)
            if saved.get("run_id") == run_id:  # another run's leftovers are not ours to send
                self.metrics = [tuple(row) for row in saved["metrics"]]
                self.tags = dict(saved["tags"])

    def __len__(self) -> int:
        return len(self.metrics) + len(self.tags)

    def add(self, metrics: list[MetricRow], tags: dict[str, str] | None = None) -> None:
        self.metrics.extend(metrics)
        self.tags.update(tags or {})

    def flush(self, send: Send) -> None:
        """Send everything in order, in batches. On a failure what is left stays pending (and in the file),
        and the error propagates."""
        try:
            while self.metrics or self.tags:
                tag_batch = dict(list(self.tags.items())[:BATCH_TAGS])
                send(self.metrics[:BATCH_METRICS], tag_batch)
                del self.metrics[:BATCH_METRICS]
                for key in tag_batch:
                    del self.tags[key]
        except Exception:
            self._save()
            raise
        if self._on_disk:
            storage.remove(self.url)
            self._on_disk = False

    def _save(self) -> None:
        storage.write_json(self.url, {"run_id": self.run_id, "metrics": [list(row) for row in self.metrics],
                                      "tags": self.tags})
        self._on_disk = True

    def save(self) -> str | None:
        """Write what is still pending to the file; returns its URL, or None when nothing is pending."""
        if not self:
            return None
        self._save()
        return self.url


def describe(url: str) -> dict[str, Any]:
    """What an outbox file holds: the run, how many metric values and tags, and which keys/steps."""
    saved = storage.read_json(url)
    steps: dict[str, list[int]] = {}
    for key, _value, _ts, step in saved["metrics"]:
        steps.setdefault(key, []).append(step)
    return {"run_id": saved["run_id"], "metrics": len(saved["metrics"]), "tags": len(saved["tags"]), "steps": steps}
