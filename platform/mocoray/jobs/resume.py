"""What `--resume` may change, checked on the driver before Ray starts, and the record of what it changed.

A run keeps its config in `run_dir/mocoray_config.json`: the config it runs with now, and `resumed_with`,
the fields its resumes changed (relative to the config it started with, which MLflow's params keep: MLflow
cannot change a param once logged, so the changes go to the tag `mocoray.resumed_with` as well).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import storage
from ..checkpoints import checkpoint_epoch, newest_good_checkpoint, read_meta
from ..config import ConfigError, PretrainConfig, flatten
from ..config.pretrain import RESUMABLE_FIELDS, resumable

CONFIG_FILE = "mocoray_config.json"


@dataclass
class ResumePoint:
    """Where a resumed run continues: its newest good checkpoint (if any), the damaged ones further on, and the
    fields it changes."""

    checkpoint: str | None
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (path, why it does not load), newest first
    changed: dict[str, Any] = field(default_factory=dict)  # field -> new value, this resume only
    resumed_with: dict[str, Any] = field(default_factory=dict)  # every resume's changes so far


def _recorded(run_dir: str, checkpoint: str | None) -> tuple[dict | None, dict[str, Any]]:
    """(config the run last ran with, its `resumed_with`), from the run's record or its newest checkpoint."""
    record_url = storage.join(run_dir, CONFIG_FILE)
    if storage.exists(record_url):
        record = storage.read_json(record_url)
        return record["config"], record.get("resumed_with", {})
    if checkpoint is not None:
        return read_meta(checkpoint).get("config"), {}
    return None, {}


def find_resume_point(run_dir: str, cfg: PretrainConfig) -> ResumePoint:
    """The run's newest good checkpoint (every file loads: see `newest_good_checkpoint`), and `cfg`'s changes to
    the run's config, refused (ConfigError, naming every field) unless all are in RESUMABLE_FIELDS and the run
    is not asked to stop before the epochs it has completed. A run whose checkpoints are all damaged is
    refused too (ConfigError, naming each with its reason)."""
    checkpoint, damaged = newest_good_checkpoint(run_dir)
    if damaged and checkpoint is None:
        listed = "; ".join(f"{path}: {problem}" for path, problem in damaged)
        raise ConfigError(f"--resume: no checkpoint of {run_dir} can be loaded ({listed}). Nothing was started. "
                          "Start the run afresh under a new name (--set run.name=...), or from another run's "
                          "checkpoint with --resume-from.")
    done = (checkpoint_epoch(checkpoint) or 0) if checkpoint else 0
    previous, resumed_with = _recorded(run_dir, checkpoint)
    before = flatten(previous or {})
    now = flatten(cfg.model_dump(mode="json"))
    changed = {k: v for k, v in now.items() if k in before and before[k] != v}
    refused = ", ".join(f"{k} ({before[k]} -> {v})" for k, v in changed.items() if not resumable(k))
    if refused:
        raise ConfigError(f"--resume cannot change {refused}: these shape the checkpointed state or the recipe "
                          f"the run's {done} epoch(s) so far followed. A resume may change "
                          f"{', '.join(RESUMABLE_FIELDS)} (a name ending in '.': its whole section). For another "
                          "recipe, start a new run (--set run.name=...) from a checkpoint with --resume-from.")
    if cfg.optim.epochs < done:
        raise ConfigError(f"optim.epochs={cfg.optim.epochs} is below the {done} epochs the run has completed")
    return ResumePoint(checkpoint, damaged, changed, {**resumed_with, **changed})


def record_config(run_dir: str, cfg: PretrainConfig, resumed_with: dict[str, Any]) -> None:
    storage.write_json(storage.join(run_dir, CONFIG_FILE),
                       {"config": cfg.model_dump(mode="json"), "resumed_with": resumed_with})
