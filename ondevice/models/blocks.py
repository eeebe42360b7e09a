"""Convolutional building blocks of the zoo and the block registry.

Every conv *block* class (the inverted residual of MobileNetV2/MCUNet, the conv-BN-ReLU block of the small
CNNs) is registered with :func:`register_block`, so other parts of the SDK (e.g. TinyTL lite-residual
branches) can find blocks by type through :func:`block_types`. Registered blocks never nest inside each
other, and each exposes the int attributes ``in_channels``, ``out_channels`` and ``stride``. Stems and
head convolutions of the ImageNet-style nets are plain ``nn.Sequential`` (unregistered), as in TinyTL,
which only attaches branches to the inverted bottlenecks.
"""

from __future__ import annotations

import torch
from torch import nn

from ondevice.errors import ConfigError

__all__ = [
    "ConvBNAct",
    "ConvBNAct1d",
    "InvertedResidual",
    "block_types",
    "conv_bn_act",
    "make_divisible",
    "register_block",
]

_BLOCKS: list[type[nn.Module]] = []


def register_block(cls: type[nn.Module]) -> type[nn.Module]:
    """Register a block class (usable as a class decorator); a duplicate registration is an error."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"register_block expects an nn.Module subclass, got {cls!r}")
    if cls in _BLOCKS:
        raise ConfigError(f"block type {cls.__qualname__} is already registered")
    _BLOCKS.append(cls)
    return cls


def block_types() -> tuple[type[nn.Module], ...]:
    """Every registered block class, in registration order (usable directly in ``isinstance``)."""
    return tuple(_BLOCKS)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to the nearest multiple of ``divisor``, never going down by more than 10 %.

    The rule of the MobileNetV2 reference implementation (Sandler et al. 2018; torchvision's
    ``_make_divisible``).
    """
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    *,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU6,
) -> nn.Sequential:
    """``Conv2d(bias=False) -> BatchNorm2d -> act`` as a plain (unregistered) ``nn.Sequential``."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


@register_block
class InvertedResidual(nn.Module):
    """MobileNetV2 inverted bottleneck (Sandler et al. 2018, Table 1), also ProxylessNAS/MCUNet's MBConv.

    ``1x1 expand (ReLU6) -> kxk depthwise (ReLU6) -> 1x1 linear projection``, the expansion skipped when
    ``expand_ratio == 1``; the input is added back when ``stride == 1`` and ``in_channels ==
    out_channels``. The layers live in ``self.conv`` (an ``nn.Sequential``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expand_ratio: float,
        kernel_size: int = 3,
        *,
        act: type[nn.Module] = nn.ReLU6,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ConfigError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        if kernel_size not in (3, 5, 7):
            raise ConfigError(f"InvertedResidual kernel_size must be 3, 5 or 7, got {kernel_size}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.stride = int(stride)
        self.kernel_size = int(kernel_size)
        self.expand_ratio = expand_ratio
        hidden = round(in_channels * expand_ratio)
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += list(conv_bn_act(in_channels, hidden, 1, act=act))
        layers += list(conv_bn_act(hidden, hidden, kernel_size, stride, groups=hidden, act=act))
        layers += [nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output, with the residual add when shapes allow it."""
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


@register_block
class ConvBNAct(nn.Module):
    """``Conv2d(bias=False) -> BatchNorm2d -> ReLU``, the block of the small image CNN."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.stride = int(stride)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``act(bn(conv(x)))``."""
        return self.act(self.bn(self.conv(x)))


@register_block
class ConvBNAct1d(nn.Module):
    """``Conv1d(bias=False) -> BatchNorm1d -> ReLU``, the block of the 1-D CNN for sensor series."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, stride: int = 1) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.stride = int(stride)
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm1d(out_channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``act(bn(conv(x)))``."""
        return self.act(self.bn(self.conv(x)))


def init_conv_weights(module: nn.Module) -> None:
    """torchvision's MobileNetV2 initialisation: Kaiming-normal (fan_out) convs, unit/zero norms."""
    for m in module.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def pooled_features(layers: list[nn.Module], *, dims: int, dropout: float) -> nn.Sequential:
    """``layers`` + global average pooling + flatten (+ dropout), initialised by :func:`init_conv_weights`.

    Every zoo CNN ends its feature extractor this way, so ``features(x)`` is a flat ``(N, C)`` tensor.
    """
    pool: nn.Module = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
    body = [*layers, pool, nn.Flatten(1)]
    if dropout > 0:
        body.append(nn.Dropout(dropout))
    features = nn.Sequential(*body)
    init_conv_weights(features)
    return features
