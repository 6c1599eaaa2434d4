"""torchvision Faster R-CNN with its backbone taken from one of our encoders' backbones (C4 or FPN).

Layouts:
* `c4`, the MoCo paper's R50-C4: the trunk up to the 4th stage (stem + res2..res4, stride 16 for a
  torchvision ResNet) feeds the RPN and a 14x14 RoIAlign; the last stage (res5 = layer4) is the RoI
  box head, followed by average pooling and the box predictor.
* `fpn`: torchvision's FPN (BackboneWithFPN over every residual stage, plus a max-pooled level), the
  standard 7x7 RoIAlign + two-layer MLP box head.

`small_resnet` (stem + 3 basic blocks) works in both: its last block is the C4 box head, its three
blocks feed the FPN.

Normalisation of the backbone and box head (`norm`): `frozen` (torchvision FrozenBatchNorm2d: the
encoder's statistics and affine parameters, fixed), `bn` (trainable BN, statistics updated by
training), `syncbn` (BN synchronised across processes, CUDA only). The MoCo paper fine-tunes with
synchronised BN because MoCo features have different statistics from supervised ones.
`frozen_stages` freezes the first stages as detectron2's FREEZE_AT does (1 = the stem, 2 = stem and
res2, ...); they also get frozen BN. The default 0 trains everything, as the paper does.

Every module keeps the encoder's child names, so an encoder state_dict maps into the detector by a
prefix per stage (`load_encoder_backbone`).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from ..core.augment import IMAGENET_MEAN, IMAGENET_STD
from ..core.backbones import SmallResNet, build_backbone
from ..core.vit import VIT_CONFIGS

LAYOUTS = ("c4", "fpn")
NORMS = ("frozen", "bn", "syncbn")
PAPER_ANCHOR_SIZES = (32, 64, 128, 256, 512)
PREFIXES_ATTR = "encoder_prefixes"  # set on the detector: [(encoder key prefix, detector key prefix)]
FASTER_RCNN_OPTIONS = set(inspect.signature(FasterRCNN.__init__).parameters) - {
    "self", "backbone", "num_classes", "min_size", "max_size", "image_mean", "image_std",
    "rpn_anchor_generator", "rpn_head", "box_roi_pool", "box_head", "box_predictor", "kwargs",
}

Stage = list[tuple[str, nn.Module, str]]  # (module name in the detector, module, encoder key prefix)


def encoder_stages(backbone: nn.Module) -> list[Stage]:
    """The stem, then one entry per residual stage, of a backbone from `core.backbones.build_backbone`."""
    if isinstance(backbone, SmallResNet):
        blocks = [(f"layer{i + 1}", block, f"layers.{i}.") for i, block in enumerate(backbone.layers)]
        return [[("stem", backbone.stem, "stem.")], *([b] for b in blocks)]
    if isinstance(backbone, torchvision.models.ResNet):
        stem = [(n, getattr(backbone, n), f"{n}.") for n in ("conv1", "bn1", "relu", "maxpool")]
        layers = ("layer1", "layer2", "layer3", "layer4")
        return [stem, *([(n, getattr(backbone, n), f"{n}.")] for n in layers)]
    raise TypeError(f"no detection layout for a {type(backbone).__name__} backbone")


def _out_channels(stage: Stage) -> int:
    norms = [m for _, module, _ in stage for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    return norms[-1].num_features


def _sequential(stages: Sequence[Stage]) -> nn.Sequential:
    return nn.Sequential(OrderedDict((name, module) for stage in stages for name, module, _ in stage))


def _prefixes(stages: Sequence[Stage], detector_prefix: str) -> list[tuple[str, str]]:
    return [(enc, f"{detector_prefix}{name}.") for stage in stages for name, _, enc in stage]


def _replace_batchnorm(root: nn.Module, prefixes: Sequence[str]) -> None:
    """Swap every BatchNorm2d whose name starts with one of `prefixes` for a FrozenBatchNorm2d with its
    statistics and affine parameters."""
    targets = [
        name for name, m in root.named_modules()
        if isinstance(m, nn.BatchNorm2d) and any(f"{name}.".startswith(p) for p in prefixes)
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name)
        bn = getattr(parent, child)
        frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
        with torch.no_grad():
            frozen.weight.copy_(bn.weight)
            frozen.bias.copy_(bn.bias)
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
        setattr(parent, child, frozen)


def _rpn(sizes: Sequence[int], aspect_ratios: Sequence[float], levels: int, channels: int) -> dict:
    """The anchor generator and RPN head: one feature map (C4) takes every size, FPN levels one each."""
    if levels == 1:
        anchors = AnchorGenerator((tuple(sizes),), (tuple(aspect_ratios),))
    elif len(sizes) != levels:
        raise ValueError(f"anchor_sizes has {len(sizes)} sizes but this FPN has {levels} levels: "
                         "give one size per level")
    else:
        anchors = AnchorGenerator(tuple((s,) for s in sizes), (tuple(aspect_ratios),) * levels)
    head = RPNHead(channels, anchors.num_anchors_per_location()[0])
    return {"rpn_anchor_generator": anchors, "rpn_head": head}


def build_detector(
    arch: str,
    num_classes: int,
    *,
    layout: str = "c4",
    norm: str = "bn",
    frozen_stages: int = 0,
    cifar_stem: bool = False,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    anchor_sizes: Sequence[int] | None = None,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    roi_size: int | None = None,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    **rcnn_options,
) -> FasterRCNN:
    """A randomly initialised Faster R-CNN whose backbone is our `arch` (see `load_encoder_backbone`).

    num_classes: object classes, background excluded (labels 1..num_classes).
    min_size / max_size: GeneralizedRCNNTransform's resizing; a sequence of min sizes picks one at
      random per training batch and uses the last at test (the paper: 480..800 train, 800 test).
    image_mean / image_std: ImageNet's, as our encoders were trained with; images go in as float 0..1.
    anchor_sizes: c4: all on the one feature map (default 32..512); fpn: one per level, where the
      levels are the residual stages plus one pooled level (default 32, 64, ... doubling).
    roi_size: RoIAlign output (default 14 for c4, whose box head halves it; 7 for fpn).
    fpn_channels / representation_size: FPN width and the MLP box head's width (fpn only).
    rcnn_options: any other FasterRCNN argument (rpn_post_nms_top_n_test, box_batch_size_per_image, ...).
    """
    if arch in VIT_CONFIGS:
        raise ValueError(f"encoder.arch={arch!r} is a ViT: detection transfer takes ResNet encoders (resnet*, "
                         "small_resnet*); a ViT detector (ViTDet) is not built")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}")
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not one of {', '.join(NORMS)}")
    if norm == "syncbn" and not torch.cuda.is_available():
        raise ValueError("norm='syncbn' needs CUDA GPUs (torch's SyncBatchNorm has no CPU path); "
                         "use norm='bn' on CPU or with a single process")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be at least 1 (background is added)")
    unknown = sorted(set(rcnn_options) - FASTER_RCNN_OPTIONS)
    if unknown:
        allowed = ", ".join(sorted(FASTER_RCNN_OPTIONS))
        raise ValueError(f"unknown detector options {unknown}; allowed: {allowed}")
    stages = encoder_stages(build_backbone(arch, cifar_stem)[0])
    if not 0 <= frozen_stages <= len(stages):
        raise ValueError(f"frozen_stages={frozen_stages} must be in 0..{len(stages)} "
                         f"(stem + {len(stages) - 1} stages)")
    transform = {"min_size": min_size, "max_size": max_size,
                 "image_mean": list(image_mean), "image_std": list(image_std)}
    if layout == "c4":
        trunk = _sequential(stages[:-1])
        trunk.out_channels = _out_channels(stages[-2])
        head_name, head_stage, _ = stages[-1][0]
        box_head = nn.Sequential(OrderedDict([(head_name, head_stage), ("pool", nn.AdaptiveAvgPool2d(1)),
                                              ("flatten", nn.Flatten())]))
        detector = FasterRCNN(
            trunk, **_rpn(anchor_sizes or PAPER_ANCHOR_SIZES, aspect_ratios, 1, trunk.out_channels),
            box_roi_pool=MultiScaleRoIAlign(["0"], roi_size or 14, sampling_ratio=0), box_head=box_head,
            box_predictor=FastRCNNPredictor(_out_channels(stages[-1]), num_classes + 1),
            **transform, **rcnn_options,
        )
        prefixes = _prefixes(stages[:-1], "backbone.") + _prefixes(stages[-1:], "roi_heads.box_head.")
    else:
        names = [stage[0][0] for stage in stages[1:]]
        body = BackboneWithFPN(
            _sequential(stages), return_layers={n: str(i) for i, n in enumerate(names)},
            in_channels_list=[_out_channels(s) for s in stages[1:]], out_channels=fpn_channels,
            extra_blocks=LastLevelMaxPool(),
        )
        levels = len(names) + 1
        size = roi_size or 7
        sizes = anchor_sizes or [32 * 2**i for i in range(levels)]
        detector = FasterRCNN(
            body, **_rpn(sizes, aspect_ratios, levels, fpn_channels),
            box_roi_pool=MultiScaleRoIAlign([str(i) for i in range(len(names))], size, sampling_ratio=2),
            box_head=TwoMLPHead(fpn_channels * size * size, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
            **transform, **rcnn_options,
        )
        prefixes = _prefixes(stages, "backbone.body.")
    detector_prefix = dict(prefixes)
    frozen = [detector_prefix[enc] for stage in stages[:frozen_stages] for _, _, enc in stage]
    for name, p in detector.named_parameters():
        if any(name.startswith(f) for f in frozen):
            p.requires_grad_(False)
    _replace_batchnorm(detector, list(detector_prefix.values()) if norm == "frozen" else frozen)
    if norm == "syncbn":
        detector = nn.SyncBatchNorm.convert_sync_batchnorm(detector)
    setattr(detector, PREFIXES_ATTR, prefixes)
    return detector


def load_encoder_backbone(detector: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Copy an encoder backbone state_dict (torchvision key names, as `checkpoints.export_backbone`
    writes; `fc.*` ignored) into the detector's backbone parts; returns {encoder key: detector key}.

    Strict: every encoder tensor must land on a detector tensor of the same shape and every backbone
    tensor of the detector must be covered, else a ValueError lists what does not fit (an encoder of
    another arch or stem). BN step counters are skipped where the detector's BN is frozen (it has none)."""
    module = detector.module if isinstance(detector, nn.parallel.DistributedDataParallel) else detector
    prefixes = getattr(module, PREFIXES_ATTR, None)
    if prefixes is None:
        raise ValueError("this detector was not built by detection.model.build_detector "
                         "(it has no encoder prefixes)")
    target = module.state_dict()
    mapping: dict[str, str] = {}
    unmapped, absent, mismatched = [], [], []
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        match = next(((e, d) for e, d in prefixes if key.startswith(e)), None)
        if match is None:
            unmapped.append(key)
            continue
        dkey = match[1] + key[len(match[0]) :]
        if dkey not in target:
            if not key.endswith("num_batches_tracked"):
                absent.append(key)
        elif target[dkey].shape != value.shape:
            mismatched.append(f"{key} {tuple(value.shape)} vs {dkey} {tuple(target[dkey].shape)}")
        else:
            mapping[key] = dkey
    covered = set(mapping.values())
    backbone_keys = [k for k in target if any(k.startswith(d) for _, d in prefixes)]
    uncovered = [k for k in backbone_keys if k not in covered and not k.endswith("num_batches_tracked")]
    problems = {
        "encoder keys outside the backbone layout": unmapped, "encoder keys the detector lacks": absent,
        "shape mismatches": mismatched, "detector backbone keys the encoder lacks": uncovered,
    }
    if any(problems.values()):
        detail = "; ".join(f"{what} ({len(keys)}): {keys[:4]}" for what, keys in problems.items() if keys)
        raise ValueError(f"the encoder backbone does not fit this detector: {detail}")
    with torch.no_grad():
        for key, dkey in mapping.items():
            target[dkey].copy_(state[key])  # state_dict tensors share storage with the module's
    return mapping
