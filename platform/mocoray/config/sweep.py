"""The sweep's config: a base pretraining recipe, a search space over its dotted fields, the scheduler.

Every space entry is checked against `PretrainConfig` before any trial starts: the field must exist,
and each grid/choice value and both ends of each range must make a valid pretraining config.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from .common import (
    ConfigError,
    Section,
    build,
    field_annotation,
    format_validation_error,
    parse_override,
    read_yaml,
    section_fields,
    set_dotted,
)
from .pretrain import PretrainConfig

# What `run_pretrain` reports to Ray Train every epoch (and so to Tune): what a sweep can rank by.
REPORTED_METRICS = ("knn_top1", "knn_margin", "knn_top1_init", "logreg_top1", "loss", "contrastive_acc", "lr",
                    "momentum", "pairs_per_s", "epoch_time_s", "epoch")
# Fields the sweep sets itself for every trial (each trial's run directory and MLflow run).
SWEEP_OWNED = ("run.name", "run.storage_path", "tracking.")
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class SpaceSpec(Section):
    """One searched field: exactly one of grid | choice | uniform | loguniform | randint.

    grid: every value, in every sample (Tune's grid_search); choice: one value drawn per sample;
    uniform / loguniform: [low, high] floats (for an integer field: integers, high included);
    randint: [low, high] integers, high included.
    """

    grid: list[Any] | None = Field(None, min_length=1)
    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SpaceSpec:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)} (got {', '.join(given) or 'none'})")
        if self.kind in ("uniform", "loguniform", "randint"):
            low, high = self.bounds
            if not low < high:
                raise ValueError(f"{self.kind}: low {low} must be < high {high}")
            if self.kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform: low {low} must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def values(self) -> list[Any]:
        """grid/choice values, or the two range ends."""
        return list(getattr(self, self.kind))

    @property
    def bounds(self) -> tuple[Any, Any]:
        return tuple(getattr(self, self.kind))  # type: ignore[return-value]

    def describe(self) -> str:
        """'loguniform[0.05, 0.5]': how the space is logged as an MLflow param."""
        return f"{self.kind}{self.values}"


class SchedulerConfig(Section):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: epochs a trial runs before it can be stopped")
    reduction_factor: float = Field(4.0, gt=1.0, description="ASHA: keep the top 1/reduction_factor at each rung")
    max_t: int | None = Field(None, ge=1, description="ASHA: epochs of a full trial; default optim.epochs")


class ResourcesConfig(Section):
    """Resources of one trial: its driver (the Tune function that fits the TorchTrainer) and its workers.

    Unset worker fields keep the base recipe's run.* values; gpus_per_worker may be fractional
    (e.g. 0.5: two trials' workers share a GPU).
    """

    trial_cpus: float = Field(1.0, gt=0.0, description="CPUs reserved for each trial's driver")
    num_workers: int | None = Field(None, ge=1)
    cpus_per_worker: float | None = Field(None, gt=0.0)
    gpus_per_worker: float | None = Field(None, gt=0.0)
    use_gpu: bool | None = None


class SweepConfig(Section):
    name: str = Field("sweep", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    base: str | dict[str, Any] = Field(
        default_factory=dict, description="pretraining recipe: a YAML path (relative to the sweep file) or a mapping"
    )
    overrides: list[str] = Field(default_factory=list, description="dotted key=value overrides of the base")
    space: dict[str, SpaceSpec] = Field(..., min_length=1, description="dotted PretrainConfig field -> values")
    num_samples: int = Field(1, ge=1, description="samples of the space (a grid is repeated per sample)")
    metric: Literal[REPORTED_METRICS] = "knn_top1"  # type: ignore[valid-type]
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as many as the cluster fits")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    storage_path: str = Field("./mocoray_sweeps", description="the sweep's folder is <storage_path>/<name>")
    tracking: dict[str, Any] = Field(default_factory=dict, description="overrides of the base recipe's tracking")


def is_int_field(dotted: str) -> bool:
    return field_annotation(PretrainConfig, dotted) is int


def _check_value(base: dict[str, Any], key: str, value: Any, what: str) -> None:
    data = copy.deepcopy(base)
    set_dotted(data, key, value)
    try:
        PretrainConfig.model_validate(data)
    except ValidationError as err:
        detail = format_validation_error(err, PretrainConfig).replace("invalid config:\n", "")
        raise ConfigError(f"space.{key}: {what} {value!r} is not a valid {key}:\n{detail}") from None


def check_space(space: dict[str, SpaceSpec], base: dict[str, Any]) -> None:
    """Every key a PretrainConfig leaf field the sweep may set; every value/range end valid there."""
    for key, spec in space.items():
        if any(key == owned or (owned.endswith(".") and key.startswith(owned)) for owned in SWEEP_OWNED):
            raise ConfigError(
                f"space.{key}: set by the sweep for each trial; use the sweep's name, storage_path or tracking"
            )
        if field_annotation(PretrainConfig, key) is None:
            section, allowed = section_fields(PretrainConfig, key + ".x")
            if section == key:
                raise ConfigError(f"space.{key}: a section, not a field; name one of its fields: {', '.join(allowed)}")
            section, allowed = section_fields(PretrainConfig, key)
            where = f"fields of {section}" if section else "top-level sections (use dotted names, e.g. moco.queue_size)"
            raise ConfigError(f"space.{key}: unknown field; allowed {where}: {', '.join(allowed)}")
        if spec.kind in ("grid", "choice"):
            for value in spec.values:
                _check_value(base, key, value, f"{spec.kind} value")
            continue
        low, high = spec.bounds
        if spec.kind == "randint" or is_int_field(key):
            if not (float(low).is_integer() and float(high).is_integer()):
                raise ConfigError(f"space.{key}: {spec.kind} over an integer field needs integer ends, got {[low, high]}")
            low, high = int(low), int(high)
        _check_value(base, key, low, f"{spec.kind} lower end")
        _check_value(base, key, high, f"{spec.kind} upper end")


def _base_mapping(base: str | dict[str, Any], relative_to: Path | None) -> dict[str, Any]:
    if isinstance(base, dict):
        return copy.deepcopy(base)
    path = Path(base)
    if not path.is_absolute() and relative_to is not None:
        path = relative_to / path
    return read_yaml(path)


def resolve(sweep: SweepConfig, relative_to: Path | None = None) -> SweepConfig:
    """The sweep with its base inlined (so the sweep folder keeps what it ran) and everything validated."""
    base = _base_mapping(sweep.base, relative_to)
    base_cfg = build(PretrainConfig, base, sweep.overrides)  # the recipe alone must be valid
    resolved = sweep.model_copy(update={"base": base_cfg.model_dump(mode="json"), "overrides": []})
    trial_base(resolved)
    check_scheduler(resolved)
    return resolved


def trial_base(sweep: SweepConfig) -> PretrainConfig:
    """The base recipe with the sweep's resources and tracking applied: what every trial starts from."""
    assert isinstance(sweep.base, dict), "call resolve() first"
    data = copy.deepcopy(sweep.base)
    for key in ("num_workers", "cpus_per_worker", "gpus_per_worker", "use_gpu"):
        value = getattr(sweep.resources, key)
        if value is not None:
            set_dotted(data, f"run.{key}", value)
    data["tracking"] = {**data.get("tracking", {}), **sweep.tracking}
    cfg = build(PretrainConfig, data)
    check_space(sweep.space, cfg.model_dump(mode="json"))
    return cfg


def max_epochs(sweep: SweepConfig) -> int:
    """Epochs of the longest trial: the base's optim.epochs, or the largest value searched for it."""
    assert isinstance(sweep.base, dict), "call resolve() first"
    spec = sweep.space.get("optim.epochs")
    if spec is None:
        return int(sweep.base["optim"]["epochs"])
    return int(max(spec.values) if spec.kind in ("grid", "choice") else math.floor(spec.bounds[1]))


def check_scheduler(sweep: SweepConfig) -> None:
    s = sweep.scheduler
    if s.type != "asha":
        return
    max_t = s.max_t or max_epochs(sweep)
    if s.grace_period > max_t:
        raise ConfigError(
            f"scheduler.grace_period={s.grace_period} must be <= scheduler.max_t={max_t} "
            "(default: optim.epochs): a trial cannot be judged after more epochs than it runs"
        )


SWEEP_FIELDS = tuple(SweepConfig.model_fields)


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """CLI `--set` items: (sweep-level ones like num_samples=8, base-recipe ones like optim.epochs=3)."""
    sweep_items, base_items = [], []
    for item in items:
        key, _ = parse_override(item)
        (sweep_items if key.split(".")[0] in SWEEP_FIELDS else base_items).append(item)
    return sweep_items, base_items


def load_sweep_config(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Sweep file at `path` with `overrides`, resolved and validated.

    Overrides name sweep fields (num_samples=8, scheduler.grace_period=2, or a whole space entry:
    space.moco.queue_size={grid: [1024, 4096]}) or, for anything else, base-recipe fields (optim.epochs=3).
    """
    data = read_yaml(path)
    sweep_items, base_items = split_overrides(overrides or [])
    for item in [i for i in sweep_items if i.startswith("space.")]:  # space keys are dotted themselves
        key, value = parse_override(item)
        data["space"] = {**(data.get("space") or {}), key.removeprefix("space."): value}
        sweep_items.remove(item)
    sweep = build(SweepConfig, data, sweep_items)
    if base_items:
        sweep = sweep.model_copy(update={"overrides": [*sweep.overrides, *base_items]})
    return resolve(sweep, Path(path).resolve().parent)


def dump_sweep(sweep: SweepConfig) -> str:
    """YAML of a (resolved) sweep, unset space kinds left out; loads back with `build(SweepConfig, ...)`."""
    return yaml.safe_dump(sweep.model_dump(mode="json", exclude_none=True), sort_keys=False)
