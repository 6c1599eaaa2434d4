"""The detection-transfer job's config: the encoder, the detection data, the Faster R-CNN, its schedule."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..detection.model import FASTER_RCNN_OPTIONS, LAYOUTS
from .common import RunConfig, Section, SGDConfig, TrackingConfig, build, parse_override, read_yaml
from .linear import DownstreamConfig

DETECTION_DATASETS = ("scattered-digits-det", "voc", "coco")
NORMS = ("auto", "frozen", "bn", "syncbn")
# What `mocoray detect` runs when no recipe is given: the CPU demo (experiments/ links to it).
DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "detect_digits.yaml"
PAPER_MIN_SIZES = list(range(480, 801, 32))  # 480, 512, ..., 800: the MoCo paper's VOC training sizes
# Which data fields each dataset reads (the rest must stay unset, so a misplaced path is not ignored).
DATA_PATHS = {
    "scattered-digits-det": (),
    "voc": ("root", "val_root"),
    "coco": ("root", "val_root", "annotations", "val_annotations"),
}
PATH_FIELDS = ("root", "val_root", "annotations", "val_annotations")


def class_list_problem(names: Sequence[str]) -> str | None:
    """What is wrong with a class list (none given, an empty name, a name given twice), or None."""
    if not names:
        return "no class names (list at least one)"
    if any(not n.strip() for n in names):
        return f"an empty class name (position {', '.join(str(i + 1) for i, n in enumerate(names) if not n.strip())})"
    twice = sorted(n for n, k in Counter(n.strip() for n in names).items() if k > 1)
    if twice:
        return f"class names given more than once: {', '.join(twice)}"
    return None


class DetectDataConfig(Section):
    """A detection dataset: scattered-digits-det (generated), Pascal VOC or COCO (local paths or URLs)."""

    name: Literal[DETECTION_DATASETS] = "scattered-digits-det"  # type: ignore[valid-type]
    root: str | None = Field(
        None, description="voc: the folder holding VOCdevkit/ (or VOCdevkit/ itself); coco: training images"
    )
    val_root: str | None = Field(
        None, description="voc: where val_sets are, if not under root; coco: the validation images (required)"
    )
    annotations: str | None = Field(None, description="coco: the training instances JSON")
    val_annotations: str | None = Field(None, description="coco: the validation instances JSON")
    train_sets: list[str] = Field(default_factory=lambda: ["2007-trainval", "2012-trainval"],
                                  description="voc: YEAR-SPLIT sets to train on (paper: 07+12 trainval)")
    val_sets: list[str] = Field(default_factory=lambda: ["2007-test"], description="voc: sets to evaluate on")
    classes: list[str] | None = Field(
        None, description="voc: the dataset's class names (label i is the i-th); default: a labels.txt in "
        "data.root, VOCdevkit/ or a VOC<year> folder, else VOC's 20 classes")
    train_canvases: int = Field(2000, ge=1, description="scattered-digits-det: training images")
    val_canvases: int = Field(500, ge=1, description="scattered-digits-det: validation images")
    canvas_size: int = Field(64, ge=26, description="scattered-digits-det: canvas side in pixels")
    max_digits: int = Field(5, ge=1, description="scattered-digits-det: digits per canvas, at most")
    flip: bool | None = Field(None, description="random horizontal flip of training images; default: on for "
                              "voc/coco, off for digits (a mirrored digit is not a digit)")
    max_images: int | None = Field(None, ge=1, description="cap on training images (quick runs)")
    max_val_images: int | None = Field(None, ge=1, description="cap on validation images (quick runs)")
    loader_workers: int = Field(0, ge=0, description="DataLoader processes per Ray worker")

    @field_validator("classes", mode="before")
    @classmethod
    def _numbers_as_names(cls, names: Any) -> Any:
        # YAML reads `classes: [1, 2]` as numbers; as class names in VOC XML they are text
        if isinstance(names, list):
            return [str(n) if isinstance(n, int) and not isinstance(n, bool) else n for n in names]
        return names

    @field_validator("classes")
    @classmethod
    def _class_names(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        problem = class_list_problem(names)
        if problem:
            raise ValueError(f"data.classes: {problem}")
        return [n.strip() for n in names]

    @model_validator(mode="after")
    def _paths_fit_the_dataset(self) -> DetectDataConfig:
        used = DATA_PATHS[self.name]
        stray = [f"data.{f}" for f in PATH_FIELDS if getattr(self, f) and f not in used]
        if stray:
            raise ValueError(f"{', '.join(stray)} not used by data.name={self.name!r} "
                             f"(it reads {', '.join(f'data.{f}' for f in used) or 'no files'})")
        required = {"voc": ("root",), "coco": ("root", "val_root", "annotations", "val_annotations")}
        missing = [f"data.{f}" for f in required.get(self.name, ()) if not getattr(self, f)]
        if missing:
            raise ValueError(f"data.name={self.name!r} needs {', '.join(missing)}")
        if self.classes is not None and self.name != "voc":
            named_by = ("its instances files' 'categories'" if self.name == "coco"
                        else "the generator (digits 0-9)")
            raise ValueError(f"data.classes is for data.name='voc' only: {self.name} data takes its classes "
                             f"from {named_by}")
        return self

    @property
    def use_flip(self) -> bool:
        return self.flip if self.flip is not None else self.name != "scattered-digits-det"


class DetectModelConfig(Section):
    """torchvision's Faster R-CNN around the encoder (detection/model.py). Defaults: the paper's R50-C4."""

    layout: Literal[LAYOUTS] = Field(  # type: ignore[valid-type]
        "c4", description="c4: trunk to the 4th stage, last stage as the RoI box head (paper); fpn: FPN")
    norm: Literal[NORMS] = Field(  # type: ignore[valid-type]
        "auto", description="BN of backbone and box head: frozen (statistics and affine fixed), bn "
        "(trained), syncbn (trained, synchronised across GPU workers); auto: syncbn with several GPU "
        "workers, else bn")
    frozen_stages: int = Field(0, ge=0, description="freeze the stem (1) and the first stages (2, 3, ...) as "
                               "detectron2's FREEZE_AT; 0 trains everything (the paper)")
    min_size: list[int] = Field(
        default_factory=lambda: list(PAPER_MIN_SIZES), min_length=1,
        description="shorter image side in training, one drawn per batch; the last one is also the test "
        "size (torchvision's convention). The paper: 480..800 train, 800 test",
    )
    max_size: int = Field(1333, ge=8, description="longer image side, at most")
    anchor_sizes: list[int] | None = Field(
        None, description="c4: every size on the one feature map (default 32..512); fpn: one per level")
    aspect_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], min_length=1)
    roi_size: int | None = Field(None, ge=1, description="RoIAlign output; default 14 (c4) / 7 (fpn)")
    fpn_channels: int = Field(256, ge=1, description="fpn only")
    representation_size: int = Field(1024, ge=1, description="fpn only: the MLP box head's width")
    rcnn: dict[str, int | float] = Field(
        default_factory=dict, description="other torchvision FasterRCNN arguments, e.g. "
        "rpn_post_nms_top_n_test, box_batch_size_per_image, box_detections_per_img")

    @field_validator("min_size")
    @classmethod
    def _sizes(cls, sizes: list[int]) -> list[int]:
        if min(sizes) < 8:
            raise ValueError(f"every size must be at least 8, got {sizes}")
        return sizes

    @field_validator("rcnn")
    @classmethod
    def _known_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - FASTER_RCNN_OPTIONS)
        if unknown:
            allowed = ", ".join(sorted(FASTER_RCNN_OPTIONS))
            raise ValueError(f"model.rcnn: unknown FasterRCNN options {unknown}; allowed: {allowed}")
        return options

    def effective_norm(self, run: RunConfig) -> str:
        """`norm` with `auto` resolved: synchronised BN across GPU workers, plain trainable BN otherwise."""
        if self.norm != "auto":
            return self.norm
        return "syncbn" if run.use_gpu and run.num_workers > 1 else "bn"


class DetectOptimConfig(SGDConfig):
    """SGD on the whole detector. Defaults: the paper's VOC schedule (24k iterations at batch 16, lr 0.02,
    100 warmup iterations, lr x0.1 at 18k and 22k). The length is `iterations` or `epochs` (passes over the
    training set, the last one cut at the iteration count); warmup and milestones always count iterations."""

    lr: float = Field(0.02, gt=0.0)
    batch_size: int = Field(16, ge=1, description="global images per iteration, split evenly across workers")
    iterations: int | None = Field(24000, ge=1, description="length in iterations (or set epochs instead)")
    epochs: int | None = Field(None, ge=1, description="length in passes over the training set")
    schedule: Literal["cosine", "step", "constant"] = "step"
    milestones: list[int] = Field(default_factory=lambda: [18000, 22000],
                                  description="iterations where a step schedule multiplies lr by gamma")
    warmup: int = Field(100, ge=0, description="iterations of linear warmup")
    clip_grad_norm: float | None = Field(None, gt=0.0)

    @model_validator(mode="before")
    @classmethod
    def _one_length(cls, data: Any) -> Any:
        # `epochs` alone replaces the default `iterations`: a recipe names one length, not both
        if isinstance(data, dict) and data.get("epochs") is not None and "iterations" not in data:
            data = {**data, "iterations": None}
        return data

    @model_validator(mode="after")
    def _length(self) -> DetectOptimConfig:
        if (self.iterations is None) == (self.epochs is None):
            raise ValueError("give exactly one of optim.iterations and optim.epochs (the schedule's length; "
                             f"got iterations={self.iterations}, epochs={self.epochs})")
        if self.iterations is not None and self.warmup >= self.iterations:
            raise ValueError(f"optim.warmup={self.warmup} must be shorter than "
                             f"optim.iterations={self.iterations}")
        return self

    def total_iterations(self, steps_per_epoch: int) -> int:
        """The run's length in iterations, for a training set that takes `steps_per_epoch` per pass."""
        if self.iterations is not None:
            return self.iterations
        return self.epochs * steps_per_epoch  # type: ignore[operator]

    def passes(self, steps_per_epoch: int) -> int:
        """Passes over the training set the run makes (the last one cut short at the iteration count)."""
        return math.ceil(self.total_iterations(steps_per_epoch) / steps_per_epoch)


class DetectEvalConfig(Section):
    every: int = Field(1, ge=1, description="epochs between evaluations (the last epoch always evaluates)")
    batch_size: int = Field(8, ge=1, description="images per inference batch, per worker")
    at_start: bool = Field(False, description="evaluate the detector before training too (step 0: the "
                           "untrained reference)")


class DetectConfig(DownstreamConfig):
    """Encoder source, detection data, the Faster R-CNN, its schedule and evaluation, run and tracking."""

    default_run_name = "detect"
    field_hints = {
        "data.image_size": "detection resizes each image by model.min_size / model.max_size",
        "optim.steps": "the lr steps are optim.milestones (iterations)",
        "optim.warmup_iters": "the warmup is optim.warmup (iterations)",
        "model.arch": "the architecture is the encoder's: encoder.arch (--arch)",
    }

    data: DetectDataConfig = Field(default_factory=DetectDataConfig)
    model: DetectModelConfig = Field(default_factory=DetectModelConfig)
    optim: DetectOptimConfig = Field(default_factory=DetectOptimConfig)
    eval: DetectEvalConfig = Field(default_factory=DetectEvalConfig)
    run: RunConfig = Field(default_factory=lambda: RunConfig(name="detect"))
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> DetectConfig:
        self.optim.check_batch_divides(self.run.num_workers)
        if self.model.norm == "syncbn" and not self.run.use_gpu:
            raise ValueError("model.norm='syncbn' needs run.use_gpu=true (SyncBatchNorm has no CPU kernel); "
                             "use model.norm=bn (what auto picks on CPUs)")
        unused = [f"run.{f}" for f in ("channels_last", "compile") if getattr(self.run, f)]
        if unused:
            raise ValueError(f"{', '.join(unused)}: not supported by the detection job (torchvision's "
                             "detector takes a list of differently sized images)")
        return self


def load_detect_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    cli_values: dict[str, Any] | None = None,
) -> DetectConfig:
    """Recipe at `path`, then `cli_values` ({dotted key: value}: CLI flags such as the run id), then the
    `--set` `overrides`, validated. A length set by `--set` (optim.iterations or optim.epochs) replaces the
    recipe's other one: `--set optim.iterations=500` shortens an epochs-long recipe."""
    data = read_yaml(path) if path else {}
    named = {parse_override(o)[0] for o in overrides or []} | set(cli_values or {})
    optim = data.get("optim")
    if isinstance(optim, dict):
        for length, other in (("iterations", "epochs"), ("epochs", "iterations")):
            if f"optim.{length}" in named and f"optim.{other}" not in named:
                optim.pop(other, None)
    return build(DetectConfig, data, overrides, cli_values)
