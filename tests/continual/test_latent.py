"""Latent replay: the frozen-front boundary and the tail."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import ondevice
from ondevice.continual import find_boundary
from ondevice.continual.latent import LatentSplit
from ondevice.errors import ConfigError
from ondevice.schemes import Sparse


@pytest.mark.parametrize(
    ("scheme", "boundary"),
    [
        ("last_layer", 5),  # every features child frozen: blocks x3, pool, flatten
        ("full", 0),
        ("bias", 0),
        (Sparse(bias_last_k=1, weight_layers=()), 2),  # the last conv block's shift trains
    ],
)
def test_boundary_is_the_longest_frozen_prefix(scheme: object, boundary: int, tiny_cnn: Callable) -> None:
    prepared = ondevice.prepare(tiny_cnn(), scheme)  # type: ignore[arg-type]
    assert find_boundary(prepared.model, trainable_buffers=tuple(prepared.trainable_buffers())) == boundary


@pytest.mark.parametrize("scheme", ["last_layer", Sparse(bias_last_k=1, weight_layers=())])
def test_tail_of_front_equals_the_full_forward(scheme: object, tiny_cnn: Callable) -> None:
    prepared = ondevice.prepare(tiny_cnn(), scheme)  # type: ignore[arg-type]
    prepared.eval()
    split = LatentSplit(prepared.model, find_boundary(prepared.model))
    x = torch.randn(4, 1, 8, 8)
    z = split.front(x)
    assert not z.requires_grad
    torch.testing.assert_close(split.tail(z), prepared(x), rtol=0, atol=0)


def test_needs_a_zoo_model() -> None:
    with pytest.raises(ConfigError, match="features"):
        find_boundary(torch.nn.Linear(3, 2))
