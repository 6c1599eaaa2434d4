"""A torchvision ResNet backbone state_dict in detectron2's key layout (as MoCo's official converter writes).

torchvision -> detectron2:

    conv1.weight                     -> stem.conv1.weight
    bn1.<p>                          -> stem.conv1.norm.<p>
    layer<i>.<b>.conv<k>.weight      -> res<i+1>.<b>.conv<k>.weight
    layer<i>.<b>.bn<k>.<p>           -> res<i+1>.<b>.conv<k>.norm.<p>
    layer<i>.<b>.downsample.0.weight -> res<i+1>.<b>.shortcut.weight
    layer<i>.<b>.downsample.1.<p>    -> res<i+1>.<b>.shortcut.norm.<p>

saved as a pickle of `{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}`
(what detectron2's checkpointer recognises as a converted model). BN step counters are left out:
detectron2's norm layers have none. To load it, a detectron2 config needs the torchvision ResNet
conventions, as MoCo's `detection/configs/*_moco.yaml` set them: `RESNETS.STRIDE_IN_1X1: False`
(torchvision strides in the 3x3 conv), `INPUT.FORMAT: RGB`, and ImageNet's RGB `PIXEL_MEAN`/`PIXEL_STD`
in 0..255 units; for resnet18/34 also `RESNETS.DEPTH` and `RES2_OUT_CHANNELS: 64`.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np
import torch

AUTHOR = "mocoray"
_BLOCK = re.compile(r"layer(?P<stage>[1-4])\.(?P<block>\d+)\.(?P<rest>.+)")
_BLOCK_PARTS = (
    (re.compile(r"conv(\d)\.weight"), r"conv\1.weight"),
    (re.compile(r"bn(\d)\.(\w+)"), r"conv\1.norm.\2"),
    (re.compile(r"downsample\.0\.weight"), "shortcut.weight"),
    (re.compile(r"downsample\.1\.(\w+)"), r"shortcut.norm.\1"),
)


def detectron2_key(key: str) -> str:
    """The detectron2 name of one torchvision ResNet key; ValueError for a key outside that layout."""
    if key == "conv1.weight":
        return "stem.conv1.weight"
    if m := re.fullmatch(r"bn1\.(\w+)", key):
        return f"stem.conv1.norm.{m[1]}"
    if m := _BLOCK.fullmatch(key):
        for pattern, replacement in _BLOCK_PARTS:
            if pattern.fullmatch(m["rest"]):
                return f"res{int(m['stage']) + 1}.{m['block']}.{pattern.sub(replacement, m['rest'])}"
    raise ValueError(f"{key!r} is not a torchvision ResNet backbone key (conv1, bn1, layer1..4)")


def to_detectron2(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """{detectron2 name: numpy array} for every tensor of a torchvision ResNet backbone (fc ignored).

    Refuses small_resnet and CIFAR-stem ResNets: detectron2's ResNets have the 7x7/2 stem + max-pool
    and four torchvision-shaped stages, so their weights have no place there."""
    if any(k.startswith(("stem.", "layers.")) for k in state):
        raise ValueError("small_resnet has no detectron2 counterpart (detectron2 builds torchvision-shaped "
                         "ResNets: 7x7 stem and four stages); export a resnet18/34/50/101 encoder instead")
    stem = state.get("conv1.weight")
    if stem is not None and tuple(stem.shape[-2:]) != (7, 7):
        raise ValueError(f"conv1.weight is {tuple(stem.shape[-2:])} (a CIFAR stem); detectron2's ResNet stem "
                         "is a 7x7/2 conv + max-pool, so this encoder cannot be loaded there")
    out = {}
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        out[detectron2_key(key)] = value.detach().cpu().numpy()
    if not out:
        raise ValueError("no backbone tensors to export")
    return out


def save_detectron2(state: Mapping[str, torch.Tensor], out_path: str) -> dict[str, Any]:
    """Write `state` (a torchvision ResNet backbone) as a detectron2 weights pickle at `out_path`
    (a path or fsspec URL); returns what was written."""
    payload = {"model": to_detectron2(state), "__author__": AUTHOR, "matching_heuristics": True}
    fs, path = fsspec.core.url_to_fs(out_path)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        pickle.dump(payload, f)
    return payload
