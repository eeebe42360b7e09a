"""MobileNetV2 (Sandler et al., CVPR 2018) in the ImageNet layout of the paper and torchvision."""

from __future__ import annotations

from torch import nn

from ondevice.models._validate import positive_float, positive_int, probability
from ondevice.models.base import ClassifierModel
from ondevice.models.blocks import InvertedResidual, conv_bn_act, make_divisible, pooled_features
from ondevice.models.registry import register_model

__all__ = ["INVERTED_RESIDUAL_SETTING", "MobileNetV2", "mobilenetv2"]

#: (expand ratio t, output channels c, repeats n, first stride s) per stage, the paper's Table 2.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(ClassifierModel):
    """MobileNetV2: 3x3 stem (stride 2), 17 inverted residual blocks, 1x1 conv to 1280, pool, linear.

    Channels are ``make_divisible(c * width_mult, round_nearest)``; the last conv keeps 1280 channels for
    ``width_mult <= 1`` (as in the paper). ``features`` ends with global average pooling, flatten and an
    optional dropout (the reference uses 0.2 before the classifier; the default here is 0 so that frozen
    features are deterministic in training mode). At ``width_mult=1``, 1000 classes, it has 3,504,872
    parameters like torchvision's ``mobilenet_v2``.
    """

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        resolution: int = 224,
        in_channels: int = 3,
        dropout: float = 0.0,
        round_nearest: int = 8,
    ) -> None:
        width_mult = positive_float("width_mult", width_mult)
        positive_int("num_classes", num_classes)
        positive_int("resolution", resolution)
        positive_int("in_channels", in_channels)
        positive_int("round_nearest", round_nearest)
        dropout = probability("dropout", dropout)
        input_channel = make_divisible(32 * width_mult, round_nearest)
        last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        layers: list[nn.Module] = [conv_bn_act(in_channels, input_channel, 3, 2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                layers.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        layers.append(conv_bn_act(input_channel, last_channel, 1))
        features = pooled_features(layers, dims=2, dropout=dropout)
        super().__init__(
            features,
            feature_dim=last_channel,
            num_classes=num_classes,
            input_shape=(in_channels, resolution, resolution),
        )
        self.width_mult = width_mult


@register_model("mobilenetv2")
def mobilenetv2(
    *,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    resolution: int = 224,
    in_channels: int = 3,
    dropout: float = 0.0,
) -> MobileNetV2:
    """MobileNetV2; e.g. ``width_mult=0.35, resolution=128`` is the tiny-training/MCU configuration."""
    return MobileNetV2(
        num_classes=num_classes,
        width_mult=width_mult,
        resolution=resolution,
        in_channels=in_channels,
        dropout=dropout,
    )
