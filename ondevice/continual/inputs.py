"""What a learner accepts as ``(x, y)``: one sample or a batch, as tensors or anything tensor-like."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from ondevice.errors import ConfigError, InputDtypeError, InputShapeError

__all__ = ["as_batch", "stream_batches"]


def as_batch(x: Any, y: Any | None, *, dtype: torch.dtype, ndim: int | None) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` as a batch: ``x`` floating point cast to ``dtype``, ``y`` int64 class indices (or None).

    ``ndim`` is the number of dims a batch has (None when unknown); an ``x`` with one dim fewer is a
    single sample and gains a batch dim, its label a scalar.

    Raises:
        InputDtypeError: ``x`` is not floating point, or ``y`` is not integer class indices.
        InputShapeError: ``x`` and ``y`` do not hold one label per sample.
    """
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        raise InputDtypeError(f"inputs must be floating point, got {x.dtype}; convert with x.float()")
    x = x.to(dtype)
    single = ndim is not None and x.dim() == ndim - 1
    if y is None:
        return (x.unsqueeze(0) if single else x), None
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InputDtypeError(f"labels must be integers (class indices), got {y.dtype}; use y.long()")
    y = y.to(torch.int64)
    if y.dim() == 0:
        if ndim is not None and not single:
            raise InputShapeError(
                f"a scalar label goes with one sample of {ndim - 1} dims, got x of shape {tuple(x.shape)}"
            )
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    elif single:
        raise InputShapeError(f"x of shape {tuple(x.shape)} is one sample but y has shape {tuple(y.shape)}")
    if y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise InputShapeError(
            f"labels must be 1-D with one label per sample: x has shape {tuple(x.shape)}, y has shape "
            f"{tuple(y.shape)}"
        )
    return x, y


def stream_batches(
    stream: Iterable[Any], *, skip: int, dtype: torch.dtype, ndim: int | None
) -> Iterator[tuple[Tensor, Tensor]]:
    """The ``(x, y)`` items of ``stream`` (samples or batches) as batches, less its first ``skip`` samples
    (a batch straddling that mark keeps its later samples).

    Raises:
        ConfigError: an item is not an ``(x, y)`` pair (raised when it is reached).
    """
    position = 0
    for item in stream:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise ConfigError(f"a stream item must be an (x, y) pair, got {type(item).__name__}")
        x, y = as_batch(item[0], item[1], dtype=dtype, ndim=ndim)
        assert y is not None
        n = int(y.shape[0])
        if position + n <= skip:
            position += n
            continue
        if position < skip:
            x, y = x[skip - position :], y[skip - position :]
        position += n
        yield x, y
