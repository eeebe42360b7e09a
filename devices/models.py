"""Models sized from the shape of sensor data: a row of features, or a ``(channels, window)`` window.

A data file or a sensor brings no model of its own, so one is built from scratch for its shape:

- :func:`feature_model`: a row of ``features`` values, learned by a ``cnn1d`` over the row as a series,
  or by an image model when the count is a square (the row is then a one-channel ``side x side`` image).
- :class:`WindowModel`: a zoo model over windows of ``(channels, window)`` readings, built once the first
  reading says how many channels the sensor sends (:class:`devices.session.SerialSession` does this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ondevice import ClassifierModel, create_model
from ondevice.errors import ConfigError

__all__ = ["FeatureModel", "WindowModel", "feature_model"]


@dataclass(frozen=True)
class FeatureModel:
    """A model built for rows of ``features`` values, and the shape one row takes to go in.

    ``input_shape`` is None when a row goes in as it is (``cnn1d``); ``(1, side, side)`` for an image
    model: reshape a batch of rows with ``x.reshape(-1, *input_shape)``.
    """

    model: ClassifierModel
    input_shape: tuple[int, ...] | None = None


def feature_model(name: str, features: int, *, num_classes: int = 2) -> FeatureModel:
    """Build the zoo model ``name`` from scratch for rows of ``features`` values.

    ``cnn1d`` reads the row as a series of ``features`` values; any other zoo model reads it as a square
    one-channel image, so ``features`` must be a square number.

    Raises:
        ConfigError: ``name`` needs square images and ``features`` is not a square.
    """
    if name == "cnn1d":
        return FeatureModel(create_model("cnn1d", num_classes=num_classes, length=features))
    side = math.isqrt(features)
    if side * side != features:
        raise ConfigError(
            f"--model {name!r} needs square images but --data has {features} features; use --model cnn1d"
        )
    return FeatureModel(create_model(name, num_classes=num_classes, resolution=side), (1, side, side))


@dataclass(frozen=True)
class WindowModel:
    """A zoo model over ``(channels, window)`` sensor windows, built when the channel count is known.

    Args:
        name: a zoo model that takes ``in_channels`` and ``length`` (``cnn1d``).
        num_classes: head rows to start with (the learner's head grows with new labels).
        options: further keyword arguments of the model, e.g. ``{"channels": (8, 16)}``.
    """

    name: str = "cnn1d"
    num_classes: int = 2
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"WindowModel.num_classes must be at least 1, got {self.num_classes}")

    def kwargs(self, channels: int, window: int) -> dict[str, Any]:
        """The model's keyword arguments for ``channels`` values per reading and ``window`` readings."""
        return {"in_channels": channels, "length": window, "num_classes": self.num_classes, **self.options}

    def build(self, channels: int, window: int) -> ClassifierModel:
        """The model, freshly initialised (from torch's global generator)."""
        return create_model(self.name, **self.kwargs(channels, window))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "options": dict(self.options)}
