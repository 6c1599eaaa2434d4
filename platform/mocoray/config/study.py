"""The study's config: a sweep, the downstream evaluations of its trials (linear, detection), which trials get them.

Everything is checked before Ray starts: the sweep (its base recipe and space, as `mocoray sweep` checks
them), each downstream recipe with its overrides, and that `trials.top + trials.random` fits the number
of trials the space can produce.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from ..core.vit import VIT_CONFIGS
from .common import ConfigError, Section, build, parse_override, read_yaml
from .detect import load_detect_config
from .linear import load_linear_config
from .sweep import SweepConfig, resolve, split_overrides, trial_base

# What a downstream recipe is validated with before any trial exists: the study sets the real encoder
# (the trial's MLflow run), run name, storage and tracking URI for each trial.
_PLACEHOLDER_ENCODER = {"encoder.random_init": True, "encoder.arch": "small_resnet"}


class DownstreamSpec(Section):
    """One downstream evaluation: a recipe (a YAML path, relative to the study file) and its --set overrides."""

    recipe: str = Field(..., min_length=1)
    overrides: list[str] = Field(default_factory=list)


class TrialSelection(Section):
    """`top` trials by the sweep's metric, plus `random` others drawn with `seed` (so the analysis is not
    biased to the top)."""

    top: int = Field(..., ge=1)
    random: int = Field(0, ge=0)
    seed: int = 0


class StudyDownstreamResources(Section):
    driver_cpus: float = Field(0.5, gt=0.0, description="CPUs of each downstream run's driver task")
    max_concurrent: int | None = Field(None, ge=1, description="downstream runs at once; default: as many as fit")


class AnalysisConfig(Section):
    bootstrap_samples: int = Field(1000, ge=100, description="resamples of the trials for each interval")
    confidence: float = Field(0.9, gt=0.0, lt=1.0, description="coverage of the bootstrap interval")
    seed: int = 0


class StudyConfig(Section):
    name: str = Field("study", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    storage_path: str = Field("./mocoray_studies", description="the study's folder is <storage_path>/<name>")
    sweep: str | dict[str, Any] = Field(..., description="a sweep recipe: YAML path (relative to the study "
                                        "file) or a mapping, as `mocoray sweep` takes")
    linear: DownstreamSpec | None = None
    detection: DownstreamSpec | None = None
    trials: Literal["all"] | TrialSelection = "all"
    include_early_stopped: bool = Field(False, description="also evaluate trials the scheduler stopped early")
    downstream: StudyDownstreamResources = Field(default_factory=StudyDownstreamResources)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)

    @field_validator("trials", mode="before")
    @classmethod
    def _trials_shape(cls, value: Any) -> Any:
        # checked here, so a mistake gets one message instead of one per branch of the union
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(TrialSelection.model_fields))
            if unknown:
                raise ValueError(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(TrialSelection.model_fields)}")
            if "top" not in value:
                raise ValueError("give top: N (the best N trials by the sweep metric), optionally random: M, seed: S")
        elif value != "all" and not isinstance(value, TrialSelection):
            raise ValueError(f"{value!r}: give all, or {{top: N, random: M, seed: S}}")
        return value

    @model_validator(mode="after")
    def _some_evaluation(self) -> StudyConfig:
        if self.linear is None and self.detection is None:
            raise ValueError("give linear: {recipe: ...} and/or detection: {recipe: ...}: a study without "
                             "downstream evaluations is a sweep (mocoray sweep)")
        return self

    @property
    def kinds(self) -> list[str]:
        """The evaluations to run on each chosen trial: 'linear', 'detection'."""
        return [k for k in ("linear", "detection") if getattr(self, k) is not None]

    @property
    def sweep_config(self) -> SweepConfig:
        assert isinstance(self.sweep, dict), "load the study with load_study_config (or resolve_study) first"
        return build(SweepConfig, self.sweep)


def trials_possible(sweep: SweepConfig) -> int:
    """How many trials the sweep produces: num_samples times the product of its grid sizes."""
    grids = [len(spec.values) for spec in sweep.space.values() if spec.kind == "grid"]
    return sweep.num_samples * math.prod(grids)


def _sweep_mapping(sweep: str | dict[str, Any], relative_to: Path | None) -> dict[str, Any]:
    """The sweep as a mapping whose `base` (when a path) is absolute: it was relative to the sweep file."""
    if isinstance(sweep, dict):
        data, where = copy.deepcopy(sweep), relative_to
    else:
        path = Path(sweep)
        if not path.is_absolute() and relative_to is not None:
            path = relative_to / path
        if not path.is_file():
            raise ConfigError(f"sweep: sweep recipe not found: {path}")
        data, where = read_yaml(path), path.resolve().parent
    base = data.get("base")
    if isinstance(base, str) and not Path(base).is_absolute() and where is not None:
        data["base"] = str(where / base)
    return data


def _recipe_path(kind: str, spec: DownstreamSpec, relative_to: Path | None) -> str:
    path = Path(spec.recipe)
    if not path.is_absolute() and relative_to is not None:
        path = relative_to / path
    if not path.is_file():
        raise ConfigError(f"{kind}.recipe: {kind} recipe not found: {path}")
    return str(path.resolve())


def resolve_study(study: StudyConfig, relative_to: Path | None = None,
                  sweep_overrides: list[str] | None = None) -> StudyConfig:
    """The study with its sweep resolved and inlined, recipe paths absolute, and every part validated.

    `sweep_overrides` are `mocoray sweep`-style items (num_samples=2, optim.epochs=3) for the sweep."""
    data = _sweep_mapping(study.sweep, relative_to)
    sweep_items, base_items = split_overrides(sweep_overrides or [])
    for item in [i for i in sweep_items if i.startswith("space.")]:  # space keys are dotted themselves
        key, value = parse_override(item)
        data["space"] = {**(data.get("space") or {}), key.removeprefix("space."): value}
        sweep_items.remove(item)
    try:
        sweep = build(SweepConfig, data, sweep_items)
        if base_items:
            sweep = sweep.model_copy(update={"overrides": [*sweep.overrides, *base_items]})
        sweep = resolve(sweep)
    except ConfigError as err:
        raise ConfigError(f"sweep: {err}") from None
    base = trial_base(sweep)
    if not base.tracking.enabled:
        raise ConfigError("sweep.tracking.enabled: a study needs MLflow (the analysis is logged there and the "
                          "downstream runs find their trial's encoder through it)")
    if study.detection is not None:
        _refuse_vit_detection(base.model.arch, sweep)

    update: dict[str, Any] = {"sweep": yaml.safe_load(yaml.safe_dump(sweep.model_dump(mode="json",
                                                                                        exclude_none=True)))}
    for kind, load in (("linear", load_linear_config), ("detection", load_detect_config)):
        spec = getattr(study, kind)
        if spec is None:
            continue
        recipe = _recipe_path(kind, spec, relative_to)
        try:
            load(recipe, spec.overrides, _PLACEHOLDER_ENCODER)
        except ConfigError as err:
            raise ConfigError(f"{kind}: {recipe}: {err}") from None
        update[kind] = spec.model_copy(update={"recipe": recipe})

    if isinstance(study.trials, TrialSelection):
        possible = trials_possible(sweep)
        wanted = study.trials.top + study.trials.random
        if wanted > possible:
            field = "trials.top" if study.trials.top > possible else "trials.random"
            raise ConfigError(f"{field}: top {study.trials.top} + random {study.trials.random} = {wanted} trials, "
                              f"but the sweep makes only {possible} (num_samples {sweep.num_samples} x its grids)")
    return study.model_copy(update=update)


def _refuse_vit_detection(base_arch: str, sweep: SweepConfig) -> None:
    """Every detection run of a ViT trial would fail (no ViT detector is built): said before the sweep runs."""
    searched = sweep.space.get("model.arch")
    archs = list(searched.values) if searched is not None else [base_arch]
    vits = [a for a in archs if a in VIT_CONFIGS]
    if vits:
        raise ConfigError(f"detection: the sweep's trials include ViT encoders (model.arch={vits[0]}), and "
                          "detection transfer takes ResNet encoders only (ViTDet is not built); drop detection: "
                          "from the study, or sweep a ResNet arch")


STUDY_FIELDS = tuple(StudyConfig.model_fields)


def load_study_config(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Study file at `path` with `overrides`, resolved and validated.

    Overrides name study fields (trials.top=2, linear.overrides=[...]) or, prefixed with `sweep.`, what
    `mocoray sweep --set` takes: sweep fields (sweep.num_samples=2) or base-recipe fields (sweep.optim.epochs=3).
    """
    data = read_yaml(path)
    study_items, sweep_items = [], []
    for item in overrides or []:
        key, _ = parse_override(item)
        if key.startswith("sweep."):
            sweep_items.append(item.removeprefix("sweep."))
        elif key.split(".")[0] in STUDY_FIELDS:
            study_items.append(item)
        else:
            raise ConfigError(f"--set {key}: unknown study field; allowed: {', '.join(STUDY_FIELDS)} "
                              "(sweep and base-recipe fields take the prefix sweep., e.g. sweep.optim.epochs=3)")
    study = build(StudyConfig, data, study_items)
    return resolve_study(study, Path(path).resolve().parent, sweep_items)


def dump_study(study: StudyConfig) -> str:
    """YAML of a resolved study; loads back with `build(StudyConfig, ...)`."""
    return yaml.safe_dump(study.model_dump(mode="json", exclude_none=True), sort_keys=False)
