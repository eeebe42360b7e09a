"""Small seeded models for the continual-learning tests (no pretraining needed)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import ondevice
from ondevice.data import TensorData, load_digits
from ondevice.models import ClassifierModel


def _tiny_cnn(num_classes: int = 2) -> ClassifierModel:
    """A 3-block cnn with narrow widths for 8x8 digits, deterministic."""
    torch.manual_seed(0)
    return ondevice.create_model("cnn", num_classes=num_classes, channels=(8, 16, 32))


@pytest.fixture
def tiny_cnn() -> Callable[..., ClassifierModel]:
    """Factory of the tiny cnn (the same weights on every call)."""
    return _tiny_cnn


@pytest.fixture
def digits() -> TensorData:
    return load_digits()


@pytest.fixture
def prepared_last_layer() -> ondevice.PreparedModel:
    return ondevice.prepare(_tiny_cnn(), "last_layer")


@pytest.fixture
def prepared_full() -> ondevice.PreparedModel:
    return ondevice.prepare(_tiny_cnn(), "full")
