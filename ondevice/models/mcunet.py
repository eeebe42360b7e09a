"""MCUNet-style network (Lin et al., NeurIPS 2020): a ProxylessNAS inverted-bottleneck net with a
per-block expand ratio and kernel size chosen from {3, 5, 7}.

The released MCUNet backbones are found by TinyNAS and shipped as JSON configs downloaded at run time;
this module cannot download, so :data:`MCUNET_IN1_BLOCKS` is a hand-written configuration in the same
search space and of the same shape as ``mcunet-in1`` (16-channel stem, an MB1 first block, then stages
of 16/24/40/48/96/160 channels with mixed kernels and expand ratios, no final 1x1 mixing conv). It is not
weight-compatible with the published checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ondevice.errors import ConfigError
from ondevice.models._validate import positive_float, positive_int, probability
from ondevice.models.base import ClassifierModel
from ondevice.models.blocks import InvertedResidual, conv_bn_act, make_divisible, pooled_features
from ondevice.models.registry import register_model

__all__ = ["MCUNET_IN1_BLOCKS", "MCUNet", "mcunet"]

#: (expand ratio, kernel size, output channels, stride) per block.
MCUNET_IN1_BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    (1, 3, 8, 1),
    (3, 7, 16, 2),
    (4, 3, 16, 1),
    (6, 7, 24, 2),
    (4, 3, 24, 1),
    (5, 5, 24, 1),
    (6, 5, 40, 2),
    (4, 5, 40, 1),
    (3, 5, 40, 1),
    (5, 5, 48, 1),
    (4, 5, 48, 1),
    (6, 7, 96, 2),
    (4, 5, 96, 1),
    (4, 3, 96, 1),
    (5, 7, 160, 1),
)


class MCUNet(ClassifierModel):
    """Stem ``3x3 conv (stride 2)``, a list of inverted residual blocks, global pool, linear head."""

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        resolution: int = 96,
        in_channels: int = 3,
        dropout: float = 0.0,
        stem_channels: int = 16,
        blocks: Sequence[tuple[int, int, int, int]] = MCUNET_IN1_BLOCKS,
    ) -> None:
        width_mult = positive_float("width_mult", width_mult)
        positive_int("num_classes", num_classes)
        positive_int("resolution", resolution)
        positive_int("in_channels", in_channels)
        dropout = probability("dropout", dropout)
        if not blocks:
            raise ConfigError("blocks must list at least one (expand, kernel, channels, stride) tuple")
        channels = make_divisible(stem_channels * width_mult)
        layers: list[nn.Module] = [conv_bn_act(in_channels, channels, 3, 2)]
        for i, spec in enumerate(blocks):
            if len(spec) != 4:
                raise ConfigError(f"blocks[{i}] must be (expand, kernel, channels, stride), got {spec!r}")
            expand, kernel, out, stride = spec
            out_channels = make_divisible(out * width_mult)
            layers.append(InvertedResidual(channels, out_channels, stride, expand, kernel))
            channels = out_channels
        features = pooled_features(layers, dims=2, dropout=dropout)
        super().__init__(
            features,
            feature_dim=channels,
            num_classes=num_classes,
            input_shape=(in_channels, resolution, resolution),
        )


@register_model("mcunet")
def mcunet(
    *,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    resolution: int = 96,
    in_channels: int = 3,
    dropout: float = 0.0,
    blocks: Sequence[tuple[int, int, int, int]] = MCUNET_IN1_BLOCKS,
) -> MCUNet:
    """MCUNet-in1-style network; ``blocks`` overrides the (expand, kernel, channels, stride) list."""
    return MCUNet(
        num_classes=num_classes,
        width_mult=width_mult,
        resolution=resolution,
        in_channels=in_channels,
        dropout=dropout,
        blocks=blocks,
    )
