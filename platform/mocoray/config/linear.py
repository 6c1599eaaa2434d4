"""The linear-evaluation job's config: which encoder, which protocol, which data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ..core.backbones import ARCHS
from .common import DataConfig, IngestConfig, RunConfig, Section, SGDConfig, TrackingConfig, load_recipe

LINEAR_MODES = ("augmented", "center", "cached", "logreg")


class EncoderConfig(Section):
    """Where the backbone comes from: exactly one of pretrain_run, checkpoint, random_init."""

    pretrain_run: str | None = Field(None, description="MLflow run id of a pretraining run (its final checkpoint; "
                                      "its encoder/ artifact where that path is not reachable)")
    checkpoint: str | None = Field(
        None, description="checkpoint directory, exported backbone .pt, or official MoCo .pth.tar (path or URL); "
        "or a registered encoder models:/NAME@ALIAS, models:/NAME/VERSION, or a run artifact runs:/ID/encoder"
    )
    random_init: bool = Field(False, description="a randomly initialised backbone: the protocol's own baseline")
    arch: Literal[ARCHS] | None = Field(  # type: ignore[valid-type]
        None, description="default: the checkpoint's meta.json / own arch entry or the run's params; "
        "required for bare files"
    )
    cifar_stem: bool | None = Field(None, description="default: like arch")
    vit_pool: Literal["cls", "mean"] = Field("cls", description="a ViT's features: the class token (MoCo v3's "
                                             "choice) or the average of its patch tokens; ViT encoders only")

    @field_validator("pretrain_run", "checkpoint", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        # `--set encoder.pretrain_run=1234...` is parsed as YAML; a run id made of digits is still an id.
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _one_source(self) -> EncoderConfig:
        given = [name for name, value in (("encoder.pretrain_run", self.pretrain_run),
                                          ("encoder.checkpoint", self.checkpoint),
                                          ("encoder.random_init", self.random_init)) if value]
        if len(given) != 1:
            raise ValueError(
                "exactly one encoder source is needed: encoder.pretrain_run (--pretrain-run RUN_ID), "
                "encoder.checkpoint (--checkpoint PATH) or encoder.random_init=true (--random-init); "
                f"got {', '.join(given) if given else 'none'}"
            )
        if self.random_init and self.arch is None:
            raise ValueError("encoder.random_init=true needs encoder.arch (there is no checkpoint to read it from)")
        return self


class LinearProtocolConfig(Section):
    mode: Literal[LINEAR_MODES] = Field(  # type: ignore[valid-type]
        "augmented",
        description="augmented: random-resized-crop + flip views through the frozen backbone every step (paper); "
        "center: centre-crop views through the backbone every step; cached: centre-crop features extracted "
        "once, fc trained on them (same result as center, much faster); logreg: scikit-learn logistic regression on "
        "the cached features, standardised (no epochs, no lr: a quick, hyperparameter-free score)",
    )
    crop_min_scale: float = Field(0.08, gt=0.0, le=1.0, description="RandomResizedCrop scale (augmented mode)")
    flip: bool = Field(True, description="random horizontal flip (augmented mode)")
    val_resize: int | None = Field(
        None, ge=8, description="shorter side before the centre crop of data.image_size (ImageNet: 256 -> 224)"
    )
    feature_norm: Literal["none", "batchnorm"] = Field(
        "none", description="batchnorm: an affine-free BatchNorm of the features before the fc layer (as later "
        "MoCo and MAE linear probes use), so the lr no longer depends on the encoder's feature scale")
    eval_every: int = Field(1, ge=1, description="epochs between validation passes (the last epoch always runs)")
    eval_batch_size: int = Field(256, ge=1, description="per-worker batch of validation / feature extraction")


class LinearDataConfig(DataConfig):
    """The labelled dataset, and where the augmented protocol's training views are made."""

    loader: Literal["torch", "ray"] = Field(
        "torch", description="torch: a DataLoader in each training worker; ray (linear.mode augmented only): a Ray "
        "Data pipeline whose tasks read, decode and crop the training views wherever data.ingest places them, "
        "streamed to the workers (validation stays on the torch loader)")
    ingest: IngestConfig = Field(default_factory=IngestConfig)


class LinearOptimConfig(SGDConfig):
    """SGD on the fc layer only. Defaults: the MoCo paper's ImageNet linear protocol."""

    lr: float = Field(30.0, gt=0.0)
    schedule: Literal["cosine", "step", "constant"] = "step"
    milestones: list[int] = Field(default_factory=lambda: [60, 80])
    weight_decay: float = Field(0.0, ge=0.0)


class DownstreamConfig(Section):
    """What the configs of jobs downstream of pretraining share (they declare `run` and `tracking` too): the
    encoder source, a missing one explained, a run name of their own, the pretraining run's MLflow experiment
    unless the config names one."""

    encoder: EncoderConfig
    default_run_name: ClassVar[str] = "downstream"

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = {"encoder": {}, **data}  # a missing source gets EncoderConfig's explanation, not "field required"
        # RunConfig's own default name is the pretraining one; a downstream run should not collide with it.
        run = data.get("run") or {}
        if isinstance(run, dict) and "name" not in run:
            data["run"] = {**run, "name": cls.default_run_name}
        return data

    @property
    def experiment_given(self) -> bool:
        """True when the config names the MLflow experiment (else: the pretraining run's experiment)."""
        return "experiment" in self.tracking.model_fields_set  # type: ignore[attr-defined]


class LinearConfig(DownstreamConfig):
    data: LinearDataConfig = Field(default_factory=LinearDataConfig)
    linear: LinearProtocolConfig = Field(default_factory=LinearProtocolConfig)
    optim: LinearOptimConfig = Field(default_factory=LinearOptimConfig)
    run: RunConfig = Field(default_factory=lambda: RunConfig(name="linear"))
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    default_run_name = "linear"
    field_hints = {
        "data.crop_min_scale": "a pretraining augmentation field; the linear protocol's crop is linear.crop_min_scale",
        "data.blur": "a pretraining augmentation field; the linear protocol has no blur",
    }

    @model_validator(mode="after")
    def _consistent(self) -> LinearConfig:
        self.optim.check_batch_divides(self.run.num_workers)
        if self.data.loader == "ray" and self.linear.mode != "augmented":
            raise ValueError(f"data.loader='ray' is for linear.mode='augmented' (new crops of every image every epoch); "
                             f"with linear.mode={self.linear.mode!r} data.loader must be 'torch' (allowed: torch, "
                             "ray with linear.mode augmented)")
        return self


def load_linear_config(
    path: str | Path | None = None, overrides: list[str] | None = None, cli_values: dict[str, Any] | None = None
) -> LinearConfig:
    """Recipe at `path`, then `cli_values` ({dotted key: value}, taken verbatim: CLI flags such as the run id),
    then the `--set` `overrides`, validated."""
    return load_recipe(LinearConfig, path, overrides, cli_values)
