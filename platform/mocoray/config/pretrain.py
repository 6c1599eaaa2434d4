"""The pretraining job's config: model, MoCo, data + augmentation, optimiser, kNN monitor, run, tracking."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..core.backbones import ARCHS
from ..core.vit import VIT_CONFIGS
from .common import DataConfig, IngestConfig, RunConfig, Section, SGDConfig, TrackingConfig, load_recipe

# What `mocoray pretrain` runs when no recipe is given: the CPU demo (experiments/ links to it).
DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "digits_moco_v2.yaml"


class ModelConfig(Section):
    arch: Literal[ARCHS] = "resnet50"  # type: ignore[valid-type]
    cifar_stem: bool = False
    freeze_patch_embed: bool = Field(False, description="ViT only: keep the random patch projection frozen "
                                     "(MoCo v3's stability trick)")

    @model_validator(mode="after")
    def _vit_fields(self) -> ModelConfig:
        vit = self.arch in VIT_CONFIGS
        if self.freeze_patch_embed and not vit:
            raise ValueError(f"model.freeze_patch_embed=true needs a ViT model.arch (one of {', '.join(VIT_CONFIGS)}), "
                             f"not {self.arch!r}")
        if self.cifar_stem and vit:
            raise ValueError(f"model.cifar_stem=true is for ResNets; model.arch={self.arch!r} is a ViT")
        return self


# What only v1/v2 have (the queue, the one-layer-or-MLP head, the key-side BN-leak handling): set under v3
# they would be silently ignored, so they are refused.
QUEUE_ONLY_FIELDS = ("queue_size", "mlp", "head_bn", "bn_mode", "num_splits")


class MocoConfig(Section):
    version: Literal["v1", "v2", "v3"] = "v2"
    queue_size: int = Field(65536, ge=1, description="K, negatives in the dictionary")
    momentum: float = Field(0.999, ge=0.0, lt=1.0, description="m of the key encoder's moving average")
    momentum_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: m rises from moco.momentum to 1.0 over training (MoCo v3, BYOL)"
    )
    temperature: float = Field(0.2, gt=0.0, le=10.0, description="tau of InfoNCE")
    dim: int = Field(128, ge=1, description="output size of the projection head")
    mlp: bool | None = Field(None, description="2-layer MLP head; default: True for v2, False for v1")
    head_bn: bool = Field(False, description="BatchNorm after the MLP head's hidden layer (as SimCLR and MoCo v3 "
                          "have it); needs the MLP head")
    bn_mode: Literal["shuffle", "split", "sync", "none"] = "shuffle"
    num_splits: int = Field(8, ge=1, description="sub-batches of SplitBatchNorm (bn_mode split)")
    hidden_dim: int = Field(4096, ge=1, description="v3: hidden width of the projection and prediction MLPs")
    proj_layers: int | None = Field(None, ge=1, description="v3: layers of the projection MLP; default 3 for a "
                                    "ViT, 2 for a ResNet (the paper's)")
    backbone_bn: Literal["global", "local"] = Field(
        "global", description="v3: a ResNet backbone's BN statistics over the global batch (all workers, as the "
        "paper's SyncBN; the heads' always are) or per worker (local)")

    @field_validator("version", mode="before")
    @classmethod
    def _version_number(cls, value: object) -> object:
        # `moco.version: 3` in YAML is an int; the version's name is "v3" everywhere else (params, compare).
        return f"v{value}" if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _v3_has_no_queue(self) -> MocoConfig:
        # Compared with the defaults, not with what was typed: workers re-validate the dumped config.
        given = sorted(f"moco.{name}" for name in QUEUE_ONLY_FIELDS if getattr(self, name) != self._default(name))
        if self.version == "v3" and given:
            raise ValueError(f"moco.version v3 has no queue and its own BN MLP heads: remove {', '.join(given)} "
                             f"(allowed under v1/v2 only); v3 uses moco.dim, moco.hidden_dim, moco.proj_layers")
        if self.version != "v3":
            given = sorted(f"moco.{name}" for name in ("hidden_dim", "proj_layers", "backbone_bn")
                           if getattr(self, name) != self._default(name))
            if given:
                raise ValueError(f"{', '.join(given)}: v3 only; moco.version is {self.version!r} (its backbone's BN "
                                 "is moco.bn_mode)")
        return self

    @classmethod
    def _default(cls, name: str) -> object:
        return cls.model_fields[name].get_default(call_default_factory=True)

    @property
    def use_mlp(self) -> bool:
        return self.version == "v2" if self.mlp is None else self.mlp

    @model_validator(mode="after")
    def _head_bn_needs_mlp(self) -> MocoConfig:
        if self.head_bn and not self.use_mlp:
            raise ValueError(f"moco.head_bn=true needs the MLP head (moco.mlp true, or moco.version v2); this "
                             f"recipe has a linear head (version {self.version!r}, mlp {self.mlp})")
        return self


class PretrainDataConfig(DataConfig):
    """The dataset plus the two-view augmentation's own fields."""

    blur: bool | None = Field(None, description="Gaussian blur in v2 augmentation; default: on above 64 px")
    crop_min_scale: float = Field(0.2, gt=0.0, le=1.0)
    color_jitter: float | None = Field(None, ge=0.0, le=1.0, description="brightness/contrast/saturation jitter "
                                       "strength (hue at most the version's); default the version's 0.4; 0: none")
    flip_p: float = Field(0.5, ge=0.0, le=1.0, description="horizontal-flip probability; 0 where left and right "
                          "differ (digits, text): flip invariance costs them accuracy")
    decode: Literal["cpu", "gpu"] = Field(
        "cpu", description="gpu: loader workers only read JPEG bytes; the training process decodes them "
        "(nvJPEG on a GPU) and makes both views on its device (imagefolder/parquet; data.augment is then unused)"
    )

    loader: Literal["torch", "ray"] = Field(
        "torch", description="torch: a DataLoader in each training worker; ray: a Ray Data pipeline whose tasks "
        "read, decode and make both views wherever data.ingest places them, streamed to the workers")
    ingest: IngestConfig = Field(default_factory=IngestConfig)

    @model_validator(mode="after")
    def _decode_source(self) -> PretrainDataConfig:
        if self.loader == "ray" and self.decode == "gpu":
            raise ValueError("data.loader='ray' makes both views in the ingest tasks, so it needs data.decode='cpu' "
                             "(data.decode='gpu' works with data.loader='torch')")
        if self.decode == "gpu" and self.name not in ("imagefolder", "parquet"):
            raise ValueError(f"data.decode='gpu' reads encoded image files: it needs data.name imagefolder or "
                             f"parquet, not {self.name!r} (whose images are already decoded in memory)")
        return self


class OptimConfig(SGDConfig):
    """SGD (or AdamW) on the query encoder. Defaults: MoCo's 200-epoch ImageNet setting (lr 0.03 for batch 256)."""

    optimizer: Literal["sgd", "adamw", "lars"] = Field(
        "sgd", description="v3 only for adamw / lars: adamw is MoCo v3's ViT optimiser (betas 0.9, 0.999; "
        "optim.sgd_momentum unused), lars its ResNet one (trust coefficient 0.001)")

    batch_size: int = Field(256, ge=2, description="global batch, split evenly across workers")
    epochs: int = Field(200, ge=1)
    milestones: list[int] = Field(default_factory=lambda: [120, 160])
    warmup_epochs: int = Field(0, ge=0)
    scale_lr: bool = Field(False, description="linear scaling rule: lr * batch_size / 256")
    clip_grad_norm: float | None = Field(None, gt=0.0)

    @property
    def effective_lr(self) -> float:
        return self.lr * self.batch_size / 256 if self.scale_lr else self.lr


class KnnConfig(Section):
    """The online monitor: weighted kNN (and optionally logistic regression) on frozen backbone features."""

    k: int = Field(20, ge=1)
    temperature: float = Field(0.1, gt=0.0)
    logreg: bool = Field(False, description="also fit logistic regression on the same standardised features "
                         "(metric logreg_top1; seconds on small sets, minutes on ImageNet-sized banks)")
    every: int = Field(1, ge=1, description="epochs between kNN evaluations (the last epoch always runs)")
    max_bank: int | None = Field(None, ge=1, description="cap on labelled images in the kNN bank")
    precise_bn: bool = Field(False, description="evaluate a copy of the trained backbone with its BN statistics "
                             "recomputed on training images, as the random-init baseline always is (training "
                             "and the exported backbone keep their running statistics)")


class ProgressConfig(Section):
    """What rank 0 tells inside an epoch (an ImageNet epoch takes minutes even on fast GPUs)."""

    print_every_steps: int | None = Field(None, ge=1, description="print a progress line every N steps")
    print_every_s: float | None = Field(60.0, gt=0.0, description="... and at least every this many seconds")
    log_every_steps: int = Field(50, ge=0, description="step_loss / step_lr / step_pairs_per_s to MLflow "
                                 "every N steps (step = global step; 0 = off)")


class PretrainRunConfig(RunConfig):
    """Workers, storage and failures, plus what pretraining adds for spot clusters: elastic worker counts,
    preemption checkpoints and mid-epoch checkpoints (see cluster/README.md for what each costs)."""

    num_workers: int | tuple[int, int] = Field(
        1, description="workers, or [min, max]: elastic training that starts with what is free, shrinks when "
        "nodes go and grows when they come back (the global batch stays optim.batch_size)")
    preemption_check_steps: int = Field(
        10, ge=0, description="steps between asking Ray whether a node of the run is being reclaimed (0: never); "
        "a notice writes a checkpoint at once")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="also checkpoint every N steps mid-epoch: bounds the work lost to a node that "
        "dies without notice or to an elastic resize")
    resize_check_s: float = Field(60.0, ge=0.0, description="elastic: seconds between looks for more free workers")
    max_preemptions: int = Field(-1, ge=-1, description="restarts after node preemptions (-1: unlimited); "
                                 "counted apart from max_failures")

    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError(f"run.num_workers={list(value) if isinstance(value, tuple) else value}: must be a count "
                             "of at least 1, or a range [min, max] with 1 <= min <= max")
        return value

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def world_sizes(self) -> range:
        """Every number of workers the run may train with."""
        low, high = (self.num_workers, self.num_workers) if isinstance(self.num_workers, int) else self.num_workers
        return range(low, high + 1)

    @property
    def max_workers(self) -> int:
        return self.world_sizes[-1]


class PretrainConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    moco: MocoConfig = Field(default_factory=MocoConfig)
    data: PretrainDataConfig = Field(default_factory=PretrainDataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    knn: KnnConfig = Field(default_factory=KnnConfig)
    run: PretrainRunConfig = Field(default_factory=PretrainRunConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    progress: ProgressConfig = Field(default_factory=ProgressConfig)

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        why = " (shuffle BN needs equal per-worker batches)"
        if self.run.elastic and self.run.max_failures == 0:
            raise ValueError(f"run.num_workers={list(self.run.num_workers)} is elastic, but run.max_failures=0 would end "
                             "the run at the first node lost without notice: set run.max_failures (-1: no limit)")
        if self.run.elastic:
            why = (f" (a world size of the elastic range run.num_workers={list(self.run.num_workers)}: the global "
                   "batch stays fixed, so every size in the range must divide it)")
        for workers in self.run.world_sizes:
            self.optim.check_batch_divides(workers, why)
            per_worker = self.optim.batch_size // workers
            split_bn = self.moco.bn_mode == "split" or (self.moco.bn_mode == "shuffle" and workers == 1)
            if split_bn and self.moco.version != "v3":  # v3's heads use global-batch BN, its keys no shuffle
                if per_worker % self.moco.num_splits:
                    raise ValueError(
                        f"per-worker batch {per_worker} (optim.batch_size / {workers} workers) must be divisible "
                        f"by moco.num_splits={self.moco.num_splits} for SplitBatchNorm"
                    )
        if self.moco.bn_mode == "sync" and not self.run.use_gpu:
            raise ValueError("moco.bn_mode='sync' needs run.use_gpu=true (SyncBatchNorm has no CPU kernel)")
        if self.run.compile and self.moco.version == "v3":
            raise ValueError("run.compile=true is for moco.version v1/v2: v3's heads all-reduce their BN statistics "
                             "inside the encoder, which a compiled graph would break around (not built)")
        if self.optim.optimizer != "sgd" and self.moco.version != "v3":
            raise ValueError(f"optim.optimizer={self.optim.optimizer!r} is for moco.version v3; v1/v2 train with sgd")
        vit_size = VIT_CONFIGS.get(self.model.arch, (self.data.image_size,))[0]
        if vit_size != self.data.image_size:
            raise ValueError(f"model.arch={self.model.arch!r} takes {vit_size} px images (its position embedding is "
                             f"learned for that grid); data.image_size is {self.data.image_size}")
        if self.optim.warmup_epochs >= self.optim.epochs and self.optim.warmup_epochs > 0:
            raise ValueError(f"optim.warmup_epochs={self.optim.warmup_epochs} must be < optim.epochs={self.optim.epochs}")
        return self


# What `--resume` may change: how long the run trains, and how it is run, monitored, checkpointed and fed.
# Everything else shapes the checkpointed state (K, dim, arch, head) or the recipe its epochs so far followed
# (lr, batch, augmentation, seed, ...), so it must match the run being continued. A name ending in "." allows
# the whole section.
RESUMABLE_FIELDS = (
    "optim.epochs", "knn.every", "knn.max_bank", "knn.precise_bn", "progress.",
    "run.num_workers", "run.use_gpu", "run.cpus_per_worker", "run.gpus_per_worker", "run.torch_threads",
    "run.max_failures", "run.checkpoint_every", "run.keep_checkpoints", "run.amp", "run.channels_last",
    "run.compile", "data.root", "data.val_root", "data.loader_workers", "data.augment", "data.decode",
    "data.loader", "data.ingest.",
    "tracking.enabled", "tracking.tracking_uri",
)


def resumable(field: str) -> bool:
    return any(field == name or (name.endswith(".") and field.startswith(name)) for name in RESUMABLE_FIELDS)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Recipe at `path` (or the schema's defaults) with `overrides` applied, validated."""
    return load_recipe(PretrainConfig, path, overrides)
