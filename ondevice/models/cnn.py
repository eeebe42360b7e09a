"""A small image CNN for 8x8 to 32x32 inputs (e.g. the digits), built from conv-BN-ReLU blocks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ondevice.models._validate import int_tuple, positive_int, probability
from ondevice.models.base import ClassifierModel
from ondevice.models.blocks import ConvBNAct, pooled_features
from ondevice.models.registry import register_model

__all__ = ["SmallCNN", "cnn"]


class SmallCNN(ClassifierModel):
    """``len(channels)`` 3x3 :class:`ConvBNAct` blocks (stride 1, then 2 for each later block), global
    average pooling, linear head. At 8x8 the default widths give spatial sizes 8 -> 4 -> 2."""

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        resolution: int = 8,
        channels: Sequence[int] = (32, 64, 128),
        dropout: float = 0.0,
    ) -> None:
        positive_int("num_classes", num_classes)
        positive_int("in_channels", in_channels)
        positive_int("resolution", resolution)
        widths = int_tuple("channels", channels)
        dropout = probability("dropout", dropout)
        layers: list[nn.Module] = []
        prev = in_channels
        for i, width in enumerate(widths):
            layers.append(ConvBNAct(prev, width, 3, 1 if i == 0 else 2))
            prev = width
        features = pooled_features(layers, dims=2, dropout=dropout)
        super().__init__(
            features,
            feature_dim=prev,
            num_classes=num_classes,
            input_shape=(in_channels, resolution, resolution),
        )


@register_model("cnn")
def cnn(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    resolution: int = 8,
    channels: Sequence[int] = (32, 64, 128),
    dropout: float = 0.0,
) -> SmallCNN:
    """Small image CNN (default: 1 x 8 x 8 input, widths 32/64/128, ~93 k parameters)."""
    return SmallCNN(
        num_classes=num_classes,
        in_channels=in_channels,
        resolution=resolution,
        channels=channels,
        dropout=dropout,
    )
