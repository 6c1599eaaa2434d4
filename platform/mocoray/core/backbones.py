"""Backbones: torchvision ResNets (optionally with a CIFAR stem), small ResNets for CPU runs, and ViTs."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from .vit import VIT_CONFIGS, ViTBackbone

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
# Small ResNets by name, as torchvision names its widths (wide_resnet50_2): a name is all a checkpoint, an
# MLflow run or a registered model has to record for the backbone to be rebuilt. The slim one has half the
# channels and a quarter of the multiply-adds: on 2 CPU cores it trains ~3.4x the pairs per second, which
# on scattered digits learns more in a fixed budget than the full width does (docs/tuning.md, issue 18).
# The wide slim one keeps the full width's last stage: that stage runs at 4x4 px, so doubling it costs
# ~1.3x the time, and its 256 features are what a linear probe reads (+0.017 logistic regression on
# digits, 3 seeds).
SMALL_RESNETS = {
    "small_resnet": (32, 64, 128, 256),
    "small_resnet_slim": (16, 32, 64, 128),
    "small_resnet_slim_wide": (16, 32, 64, 256),
}
ARCHS = (*TORCHVISION_ARCHS, *SMALL_RESNETS, *VIT_CONFIGS)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A 32 px ResNet sized for CPUs: a 3x3 stem at full resolution, then one basic block per stage,
    each halving the resolution. Per 32x32 image: 45 M multiply-adds at widths 32/64/128/256
    (`small_resnet`), 11 M at 16/32/64/128 (`small_resnet_slim`), 20 M at 16/32/64/256
    (`small_resnet_slim_wide`)."""

    def __init__(self, widths: tuple[int, ...] = SMALL_RESNETS["small_resnet"]) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        self.layers = nn.Sequential(*(BasicBlock(a, b, 2) for a, b in zip(widths[:-1], widths[1:], strict=True)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.layers(self.stem(x))), 1)


def build_backbone(arch: str, cifar_stem: bool = False) -> tuple[nn.Module, int]:
    """A randomly initialised backbone that maps images to pooled features, and the feature size.

    torchvision ResNets keep their module names (fc becomes Identity), so their state_dict is a plain
    torchvision one. `cifar_stem` swaps the 7x7/2 conv + max-pool for a 3x3/1 conv, the usual choice
    for 32 px inputs.
    """
    if arch in SMALL_RESNETS:
        net = SmallResNet(SMALL_RESNETS[arch])
        return net, net.out_dim
    if arch in VIT_CONFIGS:
        vit = ViTBackbone(arch)
        return vit, vit.out_dim
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"model.arch={arch!r} is not one of {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feat_dim


def count_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-adds of one forward pass on a single image (convolutions and linear layers)."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += out.numel() // out.shape[0] * k

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    hooks = [
        mod.register_forward_hook(conv_hook if isinstance(mod, nn.Conv2d) else linear_hook)
        for mod in model.modules()
        if isinstance(mod, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return total
