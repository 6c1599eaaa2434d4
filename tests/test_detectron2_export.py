"""Detectron2 export: torchvision ResNet keys -> the layout of MoCo's official converter, as a pickle."""

from __future__ import annotations

import pickle
import uuid

import fsspec
import numpy as np
import pytest

from mocoray.core.backbones import build_backbone
from mocoray.detection.detectron2 import detectron2_key, save_detectron2, to_detectron2

BN = ("weight", "bias", "running_mean", "running_var")


def expected_names(blocks: tuple[int, ...], convs: int, first_stage_has_shortcut: bool) -> set[str]:
    """detectron2's ResNet names: stem.conv1 (+ .norm), res2..res5 blocks with conv1..convK and, in the
    first block of a stage whose shape changes, a 1x1 shortcut (+ .norm)."""
    names = {"stem.conv1.weight", *(f"stem.conv1.norm.{p}" for p in BN)}
    for stage, count in zip(range(2, 6), blocks, strict=True):
        for block in range(count):
            for conv in (f"conv{k}" for k in range(1, convs + 1)):
                names |= {f"res{stage}.{block}.{conv}.weight", *(f"res{stage}.{block}.{conv}.norm.{p}" for p in BN)}
            if block == 0 and (stage > 2 or first_stage_has_shortcut):
                names |= {f"res{stage}.0.shortcut.weight", *(f"res{stage}.0.shortcut.norm.{p}" for p in BN)}
    return names


@pytest.mark.parametrize(("arch", "blocks", "convs", "res2_shortcut"), [
    ("resnet50", (3, 4, 6, 3), 3, True),  # bottlenecks widen 64 -> 256 in res2 already
    ("resnet18", (2, 2, 2, 2), 2, False),
])
def test_every_key_maps_to_detectron2_names_with_shapes_and_values_kept(
    arch, blocks, convs, res2_shortcut
) -> None:
    net, _ = build_backbone(arch)
    state = net.state_dict()
    exported = to_detectron2(state)
    assert set(exported) == expected_names(blocks, convs, res2_shortcut)
    tensors = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(exported) == len(tensors)  # every tensor has its own name: nothing merged or lost
    for key, value in tensors.items():
        out = exported[detectron2_key(key)]
        assert isinstance(out, np.ndarray) and out.shape == tuple(value.shape)
        assert np.array_equal(out, value.numpy())


def test_names_of_single_keys() -> None:
    assert detectron2_key("bn1.running_var") == "stem.conv1.norm.running_var"
    assert detectron2_key("layer1.0.downsample.0.weight") == "res2.0.shortcut.weight"
    assert detectron2_key("layer4.2.bn3.bias") == "res5.2.conv3.norm.bias"
    assert detectron2_key("layer3.5.conv2.weight") == "res4.5.conv2.weight"
    assert detectron2_key("layer2.0.downsample.1.running_mean") == "res3.0.shortcut.norm.running_mean"
    with pytest.raises(ValueError, match="not a torchvision ResNet backbone key"):
        detectron2_key("layer5.0.conv1.weight")


@pytest.mark.parametrize("where", ["local", "memory"])
def test_the_pickle_holds_the_model_dict_author_and_matching_heuristics(tmp_path, where) -> None:
    state = build_backbone("resnet18")[0].state_dict()
    out = str(tmp_path / "sub" / "r18.pkl") if where == "local" else f"memory://d2-{uuid.uuid4().hex}/r18.pkl"
    save_detectron2(state, out)
    with fsspec.open(out, "rb") as f:
        payload = pickle.load(f)
    assert set(payload) == {"model", "__author__", "matching_heuristics"}
    assert payload["__author__"] == "mocoray" and payload["matching_heuristics"] is True
    assert np.array_equal(payload["model"]["res5.1.conv2.weight"], state["layer4.1.conv2.weight"].numpy())


def test_small_resnet_and_cifar_stems_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="small_resnet has no detectron2 counterpart"):
        to_detectron2(build_backbone("small_resnet")[0].state_dict())
    with pytest.raises(ValueError, match=r"conv1.weight is \(3, 3\) \(a CIFAR stem\)"):
        to_detectron2(build_backbone("resnet18", cifar_stem=True)[0].state_dict())
