"""What every job's config shares: YAML recipes, dotted `--set` overrides, error wording, common sections."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config problem, phrased for the person who wrote the config."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # Unknown dotted keys a user is likely to try, with where the setting lives instead.
    field_hints: ClassVar[dict[str, str]] = {}


DATASETS = ("scattered-digits", "digits", "cifar10", "cifar100", "stl10", "imagefolder", "parquet", "synthetic")
ON_DISK_DATASETS = ("cifar10", "cifar100", "stl10", "imagefolder", "parquet")


class DataConfig(Section):
    """A labelled image dataset: what every job reads (pretraining adds its augmentation fields)."""

    name: Literal[DATASETS] = "scattered-digits"  # type: ignore[valid-type]
    root: str | None = Field(None, description="dataset folder or URL (cifar*/stl10/imagefolder/parquet)")
    val_root: str | None = Field(None, description="labelled split for kNN/linear eval if not under root")
    image_size: int = Field(32, ge=8, le=1024)
    augment: Literal["device", "loader"] = Field(
        "device", description="device: batched tensor augmentation; loader: torchvision per image in workers"
    )
    loader_workers: int = Field(0, ge=0, description="DataLoader processes per Ray worker")
    max_images: int | None = Field(None, ge=1, description="cap on training images (quick runs)")
    synthetic_images: int = Field(512, ge=8)
    synthetic_classes: int = Field(4, ge=2)

    @model_validator(mode="after")
    def _root_given(self) -> DataConfig:
        if self.name in ON_DISK_DATASETS and not self.root:
            raise ValueError(f"data.root is required for data.name={self.name!r}")
        return self


class IngestConfig(Section):
    """Where `data.loader: ray` reads, decodes and augments (pretraining; linear evaluation's augmented protocol):
    the resources of each Ray Data map task."""

    num_cpus: float = Field(1.0, gt=0.0, description="CPUs each ingest task holds")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom resources each ingest task needs, e.g. {ingest: 0.01} to run "
        "only on nodes started with that resource (CPU-only ingest nodes)")
    batch_rows: int = Field(64, ge=1, description="images per ingest task batch")
    prefetch_batches: int = Field(2, ge=0, description="batches each training worker keeps ready ahead of its step")

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory") or not name:
                raise ValueError(f"data.ingest.resources: {name!r} is not a custom resource name (CPUs are "
                                 "data.ingest.num_cpus; ingest tasks take no GPU)")
            if amount <= 0:
                raise ValueError(f"data.ingest.resources.{name}={amount}: must be a positive amount")
        return value


class RunConfig(Section):
    name: str = Field("moco", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, gt=0.0)
    storage_path: str = Field("./mocoray_runs", description="local folder or fsspec/pyarrow URL")
    seed: int = 0
    checkpoint_every: int = Field(1, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts; -1 = unlimited")
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    compile: bool = Field(False, description="torch.compile the encoders (worth it on GPUs for long runs)")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per worker (default: its CPUs)")


class TrackingConfig(Section):
    enabled: bool = True
    experiment: str = "mocoray"
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    log_backbone: bool = Field(True, description="pretraining: the exported backbone as the run's `encoder/` "
                               "artifact (what --pretrain-run and the Model Registry use on other machines)")


class SGDConfig(Section):
    """SGD with momentum and a learning-rate schedule: what every job's `optim` section has."""

    lr: float = Field(0.03, gt=0.0)
    batch_size: int = Field(256, ge=1, description="global batch, split evenly across workers")
    epochs: int = Field(100, ge=1)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[int] = Field(default_factory=list, description="epochs where a step schedule multiplies by gamma")
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    sgd_momentum: float = Field(0.9, ge=0.0, lt=1.0)

    def check_batch_divides(self, workers: int, why: str = "") -> None:
        if self.batch_size % workers:
            raise ValueError(f"optim.batch_size={self.batch_size} must be divisible by run.num_workers={workers}{why}")


# ---------------------------------------------------------------------------------------------------
# Schema navigation (for error messages and sweeps)


def _section_class(field: Any) -> type[BaseModel] | None:
    ann = field.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def section_fields(model_cls: type[BaseModel], dotted: str) -> tuple[str, list[str]]:
    """For 'moco.queu_size': ('moco', [fields of moco]); for 'mocoo.x': ('', [top-level sections])."""
    cls: Any = model_cls
    prefix: list[str] = []
    for part in dotted.split(".")[:-1]:
        field = cls.model_fields.get(part)
        if field is None or _section_class(field) is None:
            break
        cls = _section_class(field)
        prefix.append(part)
    return ".".join(prefix), list(cls.model_fields)


def field_annotation(model_cls: type[BaseModel], dotted: str) -> Any:
    """The type annotation of a leaf field by dotted name, or None if there is no such leaf."""
    cls: Any = model_cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        field = cls.model_fields.get(part)
        if field is None:
            return None
        section = _section_class(field)
        if i == len(parts) - 1:
            return None if section else field.annotation
        if section is None:
            return None
        cls = section
    return None


# ---------------------------------------------------------------------------------------------------
# Errors


def format_validation_error(err: ValidationError, model_cls: type[BaseModel]) -> str:
    lines = []
    hints = getattr(model_cls, "field_hints", {})
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        name = ".".join(loc) or "<config>"
        if e["type"] == "extra_forbidden":
            section, allowed = section_fields(model_cls, name)
            hint = f" ({hints[name]})" if name in hints else ""
            lines.append(f"{name}: unknown field{hint}; allowed fields: {', '.join(allowed)}")
        elif e["type"] == "value_error":  # a cross-field rule: its message names the fields itself
            lines.append(str(e["ctx"]["error"]) if "ctx" in e else e["msg"])
        else:
            lines.append(f"{name}={e.get('input')!r}: {e['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines)


# ---------------------------------------------------------------------------------------------------
# YAML and overrides


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = d
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'moco.queue_size=4096' -> ('moco.queue_size', 4096); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. moco.queue_size=4096")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        return key, yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text}: the value is not valid YAML ({_yaml_problem(err)}); "
                          f"quote text that is not meant as YAML, e.g. --set '{key}=\"{raw}\"'") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's explanation on one line, with 1-based line and column numbers."""
    parts = []
    for what, mark in (("context", "context_mark"), ("problem", "problem_mark")):
        text, where = getattr(err, what, None), getattr(err, mark, None)
        if text:
            parts.append(f"{text} (line {where.line + 1}, column {where.column + 1})" if where else text)
    return ": ".join(parts) or str(err).splitlines()[0]


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        with p.open() as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections (model, moco, data, optim, run, ...)")
    return data


def load_recipe(model_cls: type[BaseModel], path: str | Path | None, overrides: list[str] | None = None,
                cli_values: dict[str, Any] | None = None):
    """The recipe at `path` (or the schema's defaults) built with `build`."""
    return build(model_cls, read_yaml(path) if path else {}, overrides, cli_values)


def build(model_cls: type[BaseModel], data: dict[str, Any], overrides: list[str] | None = None,
          cli_values: dict[str, Any] | None = None):
    """`data` + `cli_values` ({dotted key: value}, taken verbatim: CLI flags such as a run id) + the `--set`
    `overrides`, validated as `model_cls`; errors become a ConfigError naming each field."""
    data = copy.deepcopy(data)
    for key, value in (cli_values or {}).items():
        set_dotted(data, key, value)
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model_cls)) from None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'moco': {'queue_size': 1}} -> {'moco.queue_size': 1}: the MLflow param names."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def dump_yaml(cfg: BaseModel, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if path:
        Path(path).write_text(text)
    return text
