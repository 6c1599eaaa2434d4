"""Typed linear-evaluation config: which encoder, which protocol, which data; same YAML/--set rules as config.py."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .config import DataConfig, RunConfig, Section, TrackingConfig, build, read_yaml, set_dotted
from .core.backbones import ARCHS

LINEAR_MODES = ("augmented", "center", "cached")


class EncoderConfig(Section):
    """Where the frozen backbone comes from: exactly one of pretrain_run, checkpoint, random_init."""

    pretrain_run: str | None = Field(None, description="MLflow run id of a pretraining run (its final checkpoint)")
    checkpoint: str | None = Field(
        None, description="checkpoint directory, exported backbone .pt, or official MoCo .pth.tar (path or URL)"
    )
    random_init: bool = Field(False, description="a randomly initialised backbone: the protocol's own baseline")
    arch: Literal[ARCHS] | None = Field(  # type: ignore[valid-type]
        None, description="default: the checkpoint's meta.json or the run's params; required for bare files"
    )
    cifar_stem: bool | None = Field(None, description="default: like arch")

    @field_validator("pretrain_run", "checkpoint", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        # `--set encoder.pretrain_run=1234...` is parsed as YAML; a run id made of digits is still an id.
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class LinearProtocolConfig(Section):
    mode: Literal[LINEAR_MODES] = Field(  # type: ignore[valid-type]
        "augmented",
        description="augmented: random-resized-crop + flip views through the frozen backbone every step (paper); "
        "center: centre-crop views through the backbone every step; cached: centre-crop features extracted "
        "once, fc trained on them (same result as center, much faster)",
    )
    crop_min_scale: float = Field(0.08, gt=0.0, le=1.0, description="RandomResizedCrop scale (augmented mode)")
    flip: bool = Field(True, description="random horizontal flip (augmented mode)")
    val_resize: int | None = Field(
        None, ge=8, description="shorter side before the centre crop of data.image_size (ImageNet: 256 -> 224)"
    )
    eval_every: int = Field(1, ge=1, description="epochs between validation passes (the last epoch always runs)")
    eval_batch_size: int = Field(256, ge=1, description="per-worker batch of validation / feature extraction")


class LinearOptimConfig(Section):
    """SGD on the fc layer only. Defaults: the MoCo paper's ImageNet linear protocol."""

    lr: float = Field(30.0, gt=0.0)
    batch_size: int = Field(256, ge=1, description="global batch, split evenly across workers")
    epochs: int = Field(100, ge=1)
    schedule: Literal["step", "cosine", "constant"] = "step"
    milestones: list[int] = Field(default_factory=lambda: [60, 80])
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    sgd_momentum: float = Field(0.9, ge=0.0, lt=1.0)


class LinearDebugConfig(Section):
    """Fault injection for the tests; leave empty in real runs."""

    unfreeze_backbone: bool = Field(
        False, description="train the backbone too (in train mode): the bit-identical check must then fail the run"
    )


class LinearConfig(Section):
    encoder: EncoderConfig
    data: DataConfig = Field(default_factory=DataConfig)
    linear: LinearProtocolConfig = Field(default_factory=LinearProtocolConfig)
    optim: LinearOptimConfig = Field(default_factory=LinearOptimConfig)
    run: RunConfig = Field(default_factory=lambda: RunConfig(name="linear"))
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    debug: LinearDebugConfig = Field(default_factory=LinearDebugConfig)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = {"encoder": {}, **data}  # a missing source gets _consistent's explanation, not "field required"
        # RunConfig's own default name is the pretraining one; a linear run should not collide with it.
        run = data.get("run") or {}
        if isinstance(run, dict) and "name" not in run:
            data["run"] = {**run, "name": "linear"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> LinearConfig:
        enc = self.encoder
        given = [name for name, value in (("encoder.pretrain_run", enc.pretrain_run),
                                          ("encoder.checkpoint", enc.checkpoint),
                                          ("encoder.random_init", enc.random_init)) if value]
        if len(given) != 1:
            raise ValueError(
                "exactly one encoder source is needed: encoder.pretrain_run (--pretrain-run RUN_ID), "
                "encoder.checkpoint (--checkpoint PATH) or encoder.random_init=true (--random-init); "
                f"got {', '.join(given) if given else 'none'}"
            )
        if enc.random_init and enc.arch is None:
            raise ValueError("encoder.random_init=true needs encoder.arch (there is no checkpoint to read it from)")
        workers, batch = self.run.num_workers, self.optim.batch_size
        if batch % workers:
            raise ValueError(f"optim.batch_size={batch} must be divisible by run.num_workers={workers}")
        for name in ("crop_min_scale", "blur"):  # compared by value, so that a dumped config validates again
            if getattr(self.data, name) != DataConfig.model_fields[name].default:
                raise ValueError(
                    f"data.{name} is a pretraining augmentation field; the linear protocol's crop is "
                    f"linear.crop_min_scale (and it has no blur)"
                )
        if self.debug.unfreeze_backbone and self.linear.mode == "cached":
            raise ValueError("debug.unfreeze_backbone needs linear.mode augmented or center (cached features "
                             "never pass gradients to the backbone)")
        if self.data.name in ("cifar10", "cifar100", "stl10", "imagefolder", "parquet") and not self.data.root:
            raise ValueError(f"data.root is required for data.name={self.data.name!r}")
        return self

    @property
    def experiment_given(self) -> bool:
        """True when the config names the MLflow experiment (else: the pretraining run's experiment)."""
        return "experiment" in self.tracking.model_fields_set


def load_linear_config(
    path: str | Path | None = None, overrides: list[str] | None = None, fixed: dict[str, Any] | None = None
) -> LinearConfig:
    """Recipe at `path`, then `fixed` ({dotted key: value}, taken verbatim: CLI flags such as the run id),
    then the `--set` `overrides`, validated."""
    data = copy.deepcopy(read_yaml(path) if path else {})
    for key, value in (fixed or {}).items():
        set_dotted(data, key, value)
    return build(LinearConfig, data, overrides)
