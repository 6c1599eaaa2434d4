"""Typed pretraining config: YAML recipes + dotted `--set a.b=c` overrides, with errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .core.backbones import ARCHS


class ConfigError(ValueError):
    """A config problem, phrased for the person who wrote the config."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    arch: Literal[ARCHS] = "resnet50"  # type: ignore[valid-type]
    cifar_stem: bool = False


class MocoConfig(Section):
    version: Literal["v1", "v2"] = "v2"
    queue_size: int = Field(65536, ge=1, description="K, negatives in the dictionary")
    momentum: float = Field(0.999, ge=0.0, lt=1.0, description="m of the key encoder's moving average")
    temperature: float = Field(0.2, gt=0.0, le=10.0, description="tau of InfoNCE")
    dim: int = Field(128, ge=1, description="output size of the projection head")
    mlp: bool | None = Field(None, description="2-layer MLP head; default: True for v2, False for v1")
    bn_mode: Literal["shuffle", "split", "sync", "none"] = "shuffle"
    num_splits: int = Field(8, ge=1, description="sub-batches of SplitBatchNorm (bn_mode split)")

    @property
    def use_mlp(self) -> bool:
        return self.version == "v2" if self.mlp is None else self.mlp


DATASETS = ("scattered-digits", "digits", "cifar10", "cifar100", "stl10", "imagefolder", "parquet", "synthetic")


class DataConfig(Section):
    name: Literal[DATASETS] = "scattered-digits"  # type: ignore[valid-type]
    root: str | None = Field(None, description="dataset folder or URL (cifar*/stl10/imagefolder/parquet)")
    val_root: str | None = Field(None, description="labelled split for kNN/linear eval if not under root")
    image_size: int = Field(32, ge=8, le=1024)
    augment: Literal["device", "loader"] = Field(
        "device", description="device: batched tensor augmentation; loader: torchvision per image in workers"
    )
    blur: bool | None = Field(None, description="Gaussian blur in v2 augmentation; default: on above 64 px")
    crop_min_scale: float = Field(0.2, gt=0.0, le=1.0)
    loader_workers: int = Field(0, ge=0, description="DataLoader processes per Ray worker")
    max_images: int | None = Field(None, ge=1, description="cap on training images (quick runs)")
    synthetic_images: int = Field(512, ge=8)
    synthetic_classes: int = Field(4, ge=2)


class OptimConfig(Section):
    lr: float = Field(0.03, gt=0.0)
    batch_size: int = Field(256, ge=2, description="global batch, split evenly across workers")
    epochs: int = Field(200, ge=1)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[int] = Field(default_factory=lambda: [120, 160])
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    warmup_epochs: int = Field(0, ge=0)
    weight_decay: float = Field(1e-4, ge=0.0)
    sgd_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    scale_lr: bool = Field(False, description="linear scaling rule: lr * batch_size / 256")
    clip_grad_norm: float | None = Field(None, gt=0.0)

    @property
    def effective_lr(self) -> float:
        return self.lr * self.batch_size / 256 if self.scale_lr else self.lr


class KnnConfig(Section):
    k: int = Field(20, ge=1)
    temperature: float = Field(0.1, gt=0.0)
    every: int = Field(1, ge=1, description="epochs between kNN evaluations (the last epoch always runs)")
    max_bank: int | None = Field(None, ge=1, description="cap on labelled images in the kNN bank")


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
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per worker (default: its CPUs)")


class TrackingConfig(Section):
    enabled: bool = True
    experiment: str = "mocoray"
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")


class DebugConfig(Section):
    """Fault injection, used by the tests to prove recovery paths; leave empty in real runs."""

    nan_at_step: int | None = Field(None, ge=0, description="replace the loss by NaN at this global step")
    crash_at_epoch: int | None = Field(None, ge=0, description="kill a worker once, during this epoch")
    crash_rank: int = Field(0, ge=0)
    crash_marker: str | None = Field(None, description="file that records the crash happened (crash once)")
    crash_delay_s: float = Field(
        5.0, ge=0.0, description="work this long into the epoch before dying: Ray Train's controller polls "
        "workers every 2 s, and a checkpoint reported less than one poll before a crash dies with the worker",
    )


class PretrainConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    moco: MocoConfig = Field(default_factory=MocoConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    knn: KnnConfig = Field(default_factory=KnnConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    debug: DebugConfig = Field(default_factory=DebugConfig)

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        workers, batch = self.run.num_workers, self.optim.batch_size
        if batch % workers:
            raise ValueError(
                f"optim.batch_size={batch} must be divisible by run.num_workers={workers} "
                "(shuffle BN needs equal per-worker batches)"
            )
        per_worker = batch // workers
        if self.moco.bn_mode == "split" or (self.moco.bn_mode == "shuffle" and workers == 1):
            if per_worker % self.moco.num_splits:
                raise ValueError(
                    f"per-worker batch {per_worker} (optim.batch_size / run.num_workers) must be divisible by "
                    f"moco.num_splits={self.moco.num_splits} for SplitBatchNorm"
                )
        if self.moco.bn_mode == "sync" and not self.run.use_gpu:
            raise ValueError("moco.bn_mode='sync' needs run.use_gpu=true (SyncBatchNorm has no CPU kernel)")
        if self.data.name in ("cifar10", "cifar100", "stl10", "imagefolder", "parquet") and not self.data.root:
            raise ValueError(f"data.root is required for data.name={self.data.name!r}")
        if self.optim.warmup_epochs >= self.optim.epochs and self.optim.warmup_epochs > 0:
            raise ValueError(f"optim.warmup_epochs={self.optim.warmup_epochs} must be < optim.epochs={self.optim.epochs}")
        return self


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


def _describe(model_cls: type[BaseModel], loc: tuple) -> str:
    """'allowed fields: a, b' for the section at `loc` (for unknown-key errors)."""
    cls: Any = model_cls
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return ""
        cls = field.annotation
    return "allowed fields: " + ", ".join(cls.model_fields)


def format_validation_error(err: ValidationError, model_cls: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        name = ".".join(loc) or "<config>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{name}: unknown field; {_describe(model_cls, loc)}")
        elif e["type"] == "value_error" and not loc:
            lines.append(str(e["ctx"]["error"]) if "ctx" in e else e["msg"])
        else:
            lines.append(f"{name}={e.get('input')!r}: {e['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines)


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
    return key, yaml.safe_load(raw) if raw.strip() else None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    with p.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections (model, moco, data, optim, run, ...)")
    return data


def build(model_cls: type[BaseModel], data: dict[str, Any], overrides: list[str] | None = None):
    data = dict(data)
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model_cls)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Recipe at `path` (or all defaults) with `overrides` applied, validated."""
    data = read_yaml(path) if path else {}
    return build(PretrainConfig, data, overrides)


def dump_yaml(cfg: BaseModel, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if path:
        Path(path).write_text(text)
    return text
