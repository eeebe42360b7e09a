"""A small vision transformer (Dosovitskiy et al., ICLR 2021) built from standard layers only.

Patch embedding is a strided ``Conv2d``; a class token and learned position embedding are added; the
blocks are pre-norm (``x + attn(norm1(x))``, ``x + mlp(norm2(x))``); attention is written with
``nn.Linear`` qkv/proj and matmul + softmax, so memory-saving ops for Linear layers apply to it; a final
``LayerNorm`` precedes taking the class token as the feature vector.
"""

from __future__ import annotations

import torch
from torch import nn

from ondevice.errors import ConfigError, InputShapeError
from ondevice.models._validate import positive_float, positive_int, probability
from ondevice.models.base import ClassifierModel
from ondevice.models.registry import register_model

__all__ = ["Attention", "PatchEmbed", "TransformerBlock", "ViT", "ViTFeatures", "vit"]


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches -> ``dim``-wide tokens ``(N, num_patches, dim)``."""

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens of shape ``(N, H/p * W/p, dim)``."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: ``softmax(q k^T / sqrt(d)) v`` with Linear ``qkv`` and ``proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output with the input's shape ``(N, T, dim)``."""
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(n, t, d)
        return self.proj(out)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: attention and a GELU MLP, each with a residual add."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = max(1, round(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + attn(norm1(x))`` then ``+ mlp(norm2(.))``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTFeatures(nn.Module):
    """Patch embedding, class token, position embedding, blocks, final norm -> class token ``(N, dim)``."""

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        dropout: float,
    ) -> None:
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(in_channels, dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised class token of each sample."""
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.norm(self.blocks(tokens))[:, 0]


class ViT(ClassifierModel):
    """Small ViT classifier; ``features`` is a :class:`ViTFeatures`."""

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 16,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        for field, value in (
            ("num_classes", num_classes),
            ("in_channels", in_channels),
            ("image_size", image_size),
            ("patch_size", patch_size),
            ("dim", dim),
            ("depth", depth),
            ("heads", heads),
        ):
            positive_int(field, value)
        mlp_ratio = positive_float("mlp_ratio", mlp_ratio)
        dropout = probability("dropout", dropout)
        if image_size % patch_size:
            raise ConfigError(
                f"image_size ({image_size}) must be a multiple of patch_size ({patch_size}); "
                f"try patch_size={next(p for p in range(patch_size, 0, -1) if image_size % p == 0)}"
            )
        if dim % heads:
            raise ConfigError(f"dim ({dim}) must be divisible by heads ({heads})")
        features = ViTFeatures(
            in_channels=in_channels,
            image_size=image_size,
            patch_size=patch_size,
            dim=dim,
            depth=depth,
            heads=heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
        )
        _init_vit(features)
        super().__init__(
            features,
            feature_dim=dim,
            num_classes=num_classes,
            input_shape=(in_channels, image_size, image_size),
            head_init_std=0.02,
        )

    def check_input(self, x: torch.Tensor) -> None:
        """Also require the exact image size (the position embedding fixes the token count)."""
        super().check_input(x)
        if tuple(x.shape[1:]) != self.input_shape:
            raise InputShapeError(
                f"ViT expects (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}; resize "
                f"the images to {self.input_shape[1]}x{self.input_shape[2]} or build the model with "
                f"image_size={x.shape[-1]}"
            )


def _init_vit(features: ViTFeatures) -> None:
    """timm's ViT initialisation: truncated-normal (std 0.02) tokens and Linear weights, zero biases."""
    nn.init.trunc_normal_(features.pos_embed, std=0.02)
    nn.init.trunc_normal_(features.cls_token, std=0.02)
    for m in features.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@register_model("vit")
def vit(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 16,
    patch_size: int = 4,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: float = 2.0,
    dropout: float = 0.0,
) -> ViT:
    """Small ViT (default 1 x 16 x 16 input, 4x4 patches, dim 64, depth 4, 4 heads)."""
    return ViT(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        patch_size=patch_size,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_ratio,
        dropout=dropout,
    )
