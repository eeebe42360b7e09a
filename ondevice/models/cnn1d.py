"""A 1-D CNN for sensor time series of shape ``(channels, length)``, built from Conv1d-BN-ReLU blocks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ondevice.errors import ConfigError
from ondevice.models._validate import int_tuple, positive_int, probability
from ondevice.models.base import ClassifierModel
from ondevice.models.blocks import ConvBNAct1d, pooled_features
from ondevice.models.registry import register_model

__all__ = ["CNN1d", "cnn1d"]


class CNN1d(ClassifierModel):
    """``len(channels)`` :class:`ConvBNAct1d` blocks (stride 1, then 2), global average pooling, linear."""

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        length: int = 64,
        channels: Sequence[int] = (32, 64, 128),
        kernel_size: int = 5,
        dropout: float = 0.0,
    ) -> None:
        positive_int("num_classes", num_classes)
        positive_int("in_channels", in_channels)
        positive_int("length", length)
        positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd (so padding keeps the length), got {kernel_size}")
        widths = int_tuple("channels", channels)
        dropout = probability("dropout", dropout)
        layers: list[nn.Module] = []
        prev = in_channels
        for i, width in enumerate(widths):
            layers.append(ConvBNAct1d(prev, width, kernel_size, 1 if i == 0 else 2))
            prev = width
        features = pooled_features(layers, dims=1, dropout=dropout)
        super().__init__(
            features, feature_dim=prev, num_classes=num_classes, input_shape=(in_channels, length)
        )


@register_model("cnn1d")
def cnn1d(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    length: int = 64,
    channels: Sequence[int] = (32, 64, 128),
    kernel_size: int = 5,
    dropout: float = 0.0,
) -> CNN1d:
    """1-D CNN for ``(in_channels, length)`` series (default 1 x 64: a digit scanned row by row)."""
    return CNN1d(
        num_classes=num_classes,
        in_channels=in_channels,
        length=length,
        channels=channels,
        kernel_size=kernel_size,
        dropout=dropout,
    )
