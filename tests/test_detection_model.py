"""Faster R-CNN from our backbones: C4 / FPN layouts, loading an encoder, BN modes, frozen stages."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from mocoray.core.backbones import build_backbone
from mocoray.detection.model import build_detector, load_encoder_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = {"min_size": 64, "max_size": 64, "box_batch_size_per_image": 32, "rpn_post_nms_top_n_train": 200}


def _encoder_state(arch: str, seed: int = 0, cifar_stem: bool = False) -> dict[str, torch.Tensor]:
    """A backbone state whose every tensor is distinct from a fresh init (BN statistics included)."""
    torch.manual_seed(seed)
    net, _ = build_backbone(arch, cifar_stem)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(seed + 7)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            else:
                t.normal_()
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_c4_is_the_trunk_to_stage_four_at_stride_16_with_the_last_stage_as_box_head() -> None:
    model = build_detector("resnet50", 20, layout="c4")
    features = model.backbone(torch.zeros(1, 3, 64, 96))
    assert features.shape == (1, 1024, 4, 6)  # res4: stride 16
    assert [n for n, _ in model.backbone.named_children()] == [
        "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]
    head = model.roi_heads.box_head
    assert [n for n, _ in head.named_children()] == ["layer4", "pool", "flatten"]
    assert model.roi_heads.box_roi_pool.output_size == (14, 14)
    assert head(torch.zeros(2, 1024, 14, 14)).shape == (2, 2048)  # res5 then average pooling
    assert model.roi_heads.box_predictor.cls_score.out_features == 21  # + background
    assert model.transform.min_size == (800,) and model.transform.image_mean == [0.485, 0.456, 0.406]


@pytest.mark.parametrize(("arch", "levels", "strides"), [
    ("resnet18", ["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64]),
    ("small_resnet", ["0", "1", "2", "pool"], [2, 4, 8, 16]),
])
def test_fpn_takes_every_residual_stage_plus_a_pooled_level(arch, levels, strides) -> None:
    model = build_detector(arch, 10, layout="fpn", anchor_sizes=[16] * len(levels))
    out = model.backbone(torch.zeros(1, 3, 64, 64))
    assert list(out) == levels and [64 // o.shape[-1] for o in out.values()] == strides
    assert all(o.shape[1] == 256 for o in out.values())


@pytest.mark.parametrize(("arch", "layout", "norm"), [
    *((a, layout, norm)
      for a in ("small_resnet", "resnet18") for layout in ("c4", "fpn") for norm in ("bn", "frozen")),
    ("resnet50", "c4", "frozen"),
])
def test_every_backbone_tensor_equals_the_encoders_after_loading(arch, layout, norm) -> None:
    state = _encoder_state(arch)
    model = build_detector(arch, 10, layout=layout, norm=norm)
    mapping = load_encoder_backbone(model, state)
    loaded = model.state_dict()
    counters = {k for k in state if k.endswith("num_batches_tracked")}
    assert set(mapping) == set(state) - (counters if norm == "frozen" else set())
    for key, dkey in mapping.items():
        assert torch.equal(loaded[dkey], state[key]), key
    # the whole encoder lives in the detector: nothing else starts with the backbone's prefixes
    c4_head = "roi_heads.box_head." + ("layer3." if arch == "small_resnet" else "layer4.")
    body = "backbone.body." if layout == "fpn" else "backbone."
    backbone_keys = {k for k in loaded if (k.startswith(body) and "fpn" not in k) or k.startswith(c4_head)}
    assert backbone_keys == set(mapping.values())


def test_loading_refuses_an_encoder_of_another_arch_or_stem_naming_the_keys() -> None:
    with pytest.raises(ValueError, match=r"detector backbone keys the encoder lacks \(\d+\): \['backbone.layer1.2"):
        load_encoder_backbone(build_detector("resnet34", 10), _encoder_state("resnet18"))
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): \['conv1.weight \(64, 3, 3, 3\)"):
        load_encoder_backbone(build_detector("resnet18", 10), _encoder_state("resnet18", cifar_stem=True))
    with pytest.raises(ValueError, match="outside the backbone layout"):
        load_encoder_backbone(build_detector("small_resnet", 10), _encoder_state("resnet18"))
    with pytest.raises(ValueError, match="not built by detection.model.build_detector"):
        load_encoder_backbone(nn.Linear(2, 2), {})


def _one_step(model: nn.Module) -> None:
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([3])} for _ in range(2)]
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sum(model(images, targets).values()).backward()
    opt.step()


def _backbone_norm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    norms = {n for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))}
    return {k: v.clone() for k, v in model.state_dict().items() if k.rpartition(".")[0] in norms}


def test_frozen_norm_leaves_backbone_bn_untouched_by_a_step_and_bn_trains_it() -> None:
    state = _encoder_state("small_resnet")
    frozen = build_detector("small_resnet", 10, norm="frozen", anchor_sizes=(16, 32), **SMALL)
    load_encoder_backbone(frozen, state)
    before = _backbone_norm_state(frozen)
    norms = [m for n, m in frozen.named_modules() if "bn" in n.split(".")[-1]]
    assert before and norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    _one_step(frozen)
    after = _backbone_norm_state(frozen)
    assert all(torch.equal(before[k], after[k]) for k in before)
    mapping = load_encoder_backbone(frozen, state)
    assert all(torch.equal(after[d], state[e]) for e, d in mapping.items() if d in after)

    trained = build_detector("small_resnet", 10, norm="bn", anchor_sizes=(16, 32), **SMALL)
    load_encoder_backbone(trained, state)
    before = _backbone_norm_state(trained)
    _one_step(trained)
    after = _backbone_norm_state(trained)
    for suffix in ("weight", "running_mean", "running_var"):
        changed = [k for k in before if k.endswith(suffix) and not torch.equal(before[k], after[k])]
        assert len(changed) == len([k for k in before if k.endswith(suffix)]), suffix


def test_frozen_stages_stop_training_the_stem_and_first_stages() -> None:
    model = build_detector("resnet18", 10, layout="fpn", frozen_stages=2)  # stem + res2 (layer1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("backbone.body.conv1", "backbone.body.layer1.")) for n in frozen)
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    assert isinstance(model.backbone.body.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(model.backbone.body.layer2[0].bn1, nn.BatchNorm2d)
    assert all(p.requires_grad for p in model.backbone.body.layer2.parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_syncbn_is_refused_on_cpu_with_the_alternative() -> None:
    with pytest.raises(ValueError, match=r"norm='syncbn' needs CUDA.*use norm='bn'"):
        build_detector("small_resnet", 10, norm="syncbn")


def test_bad_layout_norm_stages_and_options_name_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="layout='r50' is not one of c4, fpn"):
        build_detector("resnet18", 10, layout="r50")
    with pytest.raises(ValueError, match="norm='gn' is not one of frozen, bn, syncbn"):
        build_detector("resnet18", 10, norm="gn")
    with pytest.raises(ValueError, match=r"frozen_stages=6 must be in 0\.\.5"):
        build_detector("resnet18", 10, frozen_stages=6)
    with pytest.raises(ValueError, match=r"unknown detector options \['rpn_top_n'\]; allowed: .*rpn_post_nms"):
        build_detector("resnet18", 10, rpn_top_n=5)
    with pytest.raises(ValueError, match="one size per level"):
        build_detector("small_resnet", 10, layout="fpn", anchor_sizes=(16, 32))
    with pytest.raises(ValueError, match="model.arch='vit' is not one of"):
        build_detector("vit", 10)
