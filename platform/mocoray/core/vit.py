"""Vision Transformers (torchvision's) as MoCo v3 backbones, with the frozen random patch projection."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

# name -> (image_size, patch_size, layers, heads, hidden_dim, mlp_dim). The image size is part of the name
# because the position embedding is learned for one grid of patches: the name alone rebuilds the backbone.
# ViT-S/16 and ViT-B/16 are MoCo v3's configurations; the tiny one sees 32 px images as 8x8 patches of 4 px
# (65 tokens of 128 dims, 4 blocks: ~55 M multiply-adds per image counted by hand; on a loaded 2-core CPU
# its forward + backward took ~5x as long as small_resnet_slim_wide's).
VIT_CONFIGS = {
    "vit_small_patch16_224": (224, 16, 12, 6, 384, 1536),
    "vit_base_patch16_224": (224, 16, 12, 12, 768, 3072),
    "vit_tiny_patch4_32": (32, 4, 4, 4, 128, 512),
}
VIT_POOLS = ("cls", "mean")


class ViTBackbone(nn.Module):
    """A torchvision VisionTransformer without its classifier: images -> the class token (`pool` "cls", MoCo
    v3's choice) or the average of the patch tokens (`pool` "mean"), after the final LayerNorm."""

    def __init__(self, arch: str, pool: str = "cls") -> None:
        super().__init__()
        image_size, patch, layers, heads, hidden, mlp = VIT_CONFIGS[arch]
        self.vit = VisionTransformer(image_size, patch, layers, heads, hidden, mlp)
        self.vit.heads = nn.Identity()
        self.out_dim = hidden
        self.image_size = image_size
        self.set_pool(pool)

    def set_pool(self, pool: str) -> None:
        if pool not in VIT_POOLS:
            raise ValueError(f"ViT pooling {pool!r} is not one of {', '.join(VIT_POOLS)}")
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit._process_input(x)
        cls = self.vit.class_token.expand(tokens.shape[0], -1, -1)
        out = self.vit.encoder(torch.cat([cls, tokens], dim=1))
        return out[:, 0] if self.pool == "cls" else out[:, 1:].mean(dim=1)


def freeze_patch_embed(backbone: nn.Module) -> None:
    """MoCo v3's stability trick: the patch projection stays at its random initialisation (no gradient, so
    neither the optimiser nor weight decay moves it)."""
    if not isinstance(backbone, ViTBackbone):
        raise ValueError("model.freeze_patch_embed=true needs a ViT model.arch (vit_*)")
    for p in backbone.vit.conv_proj.parameters():
        p.requires_grad_(False)
