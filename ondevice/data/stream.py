"""Sample streams: every data source becomes an iterable of batched ``(x, y)`` tensor pairs.

:class:`Stream` walks an in-memory :class:`TensorData` (optionally shuffled, for several epochs);
:class:`IterableStream` batches anything else that yields ``(x, y)`` pairs (a ``Dataset``, a
``DataLoader``, a generator reading a sensor). :func:`as_stream` picks the right one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ondevice.data.tensordata import TensorData
from ondevice.errors import ConfigError

__all__ = ["IterableStream", "Stream", "as_stream"]

Batch = tuple[torch.Tensor, torch.Tensor]

_ACCEPTED = (
    "a TensorData, an (x, y) tuple of tensors or numpy arrays, a torch Dataset or DataLoader yielding "
    "(x, y), or any iterable of (x, y) pairs"
)


def _check_common(batch_size: int | None, epochs: int) -> None:
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be a positive int, got {epochs!r}")


def _to_x(value: Any) -> torch.Tensor:
    x = torch.as_tensor(value)
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def _to_y(value: Any) -> torch.Tensor:
    y = torch.as_tensor(value)
    if y.dtype.is_floating_point:
        if not torch.equal(y, torch.round(y)):
            raise ConfigError(f"labels must be integers (class indices), got non-integral {y.dtype} values")
    elif y.dtype == torch.bool or y.dtype.is_complex:
        raise ConfigError(f"labels must be integers (class indices), got {y.dtype}")
    return y.to(torch.int64)


def _as_pair(item: Any) -> Batch:
    """Validate and convert one item yielded by a source into ``(x, y)`` tensors."""
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise ConfigError(
            f"a stream item must be an (x, y) pair, got {type(item).__name__}"
            + (f" of length {len(item)}" if isinstance(item, tuple | list) else "")
        )
    x, y = _to_x(item[0]), _to_y(item[1])
    if y.dim() > 1:
        raise ConfigError(
            f"labels must be a scalar (one sample) or 1-D (a batch), got shape {tuple(y.shape)}"
        )
    if y.dim() == 1 and (x.dim() == 0 or x.shape[0] != y.shape[0]):
        raise ConfigError(f"batched x and y differ in length: x {tuple(x.shape)}, y {tuple(y.shape)}")
    return x, y


class Stream:
    """Batches of an in-memory dataset: ``for x, y in Stream(data, batch_size=8, shuffle=True): ...``.

    Every epoch yields every sample exactly once, in order or (``shuffle=True``) in a fresh permutation;
    with a ``seed`` the sequence of permutations is the same each time the stream is iterated. Batches
    always have a leading batch dimension (``batch_size=1`` gives one sample at a time). ``len(stream)``
    is the number of batches one full iteration yields (all epochs).
    """

    def __init__(
        self,
        source: TensorData | tuple[torch.Tensor, torch.Tensor],
        *,
        batch_size: int = 1,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
        epochs: int = 1,
    ) -> None:
        if isinstance(source, tuple) and len(source) == 2:
            source = TensorData(_to_x(source[0]), _to_y(source[1]))
        if not isinstance(source, TensorData):
            raise ConfigError(
                f"Stream needs a TensorData or an (x, y) tuple, got {type(source).__name__}; "
                f"use as_stream for other sources"
            )
        _check_common(batch_size, epochs)
        self.data = source
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.epochs = epochs

    @property
    def batches_per_epoch(self) -> int:
        """Batches yielded per epoch."""
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return self.epochs * self.batches_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.data)
        gen = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                if self.drop_last and idx.numel() < self.batch_size:
                    break
                yield self.data.x[idx], self.data.y[idx]

    def __repr__(self) -> str:
        return (
            f"Stream(n={len(self.data)}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"epochs={self.epochs})"
        )


class _MapDataset:
    """Re-iterable view of a map-style Dataset, optionally in a fresh permutation per pass."""

    def __init__(self, dataset: Any, *, shuffle: bool, seed: int | None) -> None:
        self.dataset = dataset
        self.shuffle = shuffle
        self._gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Any]:
        n = len(self.dataset)
        order = torch.randperm(n, generator=self._gen).tolist() if self.shuffle else range(n)
        for i in order:
            yield self.dataset[i]


class IterableStream:
    """Batches from any source of ``(x, y)`` pairs, single samples or batches.

    An item whose label is a scalar is one sample and gets a batch dimension; an item with a 1-D label is
    a batch. With ``batch_size=None`` batches pass through unchanged and single samples come out one at a
    time; with a ``batch_size`` items are re-batched to that size (the last may be smaller unless
    ``drop_last``). A one-shot iterator (e.g. a generator) can be iterated once only.
    """

    def __init__(
        self,
        source: Iterable[Any],
        *,
        batch_size: int | None = None,
        drop_last: bool = False,
        epochs: int = 1,
    ) -> None:
        _check_common(batch_size, epochs)
        if epochs > 1 and iter(source) is source:
            raise ConfigError(
                "epochs > 1 needs a re-iterable source, got a one-shot iterator; pass a list, Dataset or "
                "DataLoader instead"
            )
        self.source = source
        self.batch_size = batch_size
        self.drop_last = bool(drop_last)
        self.epochs = epochs

    def __len__(self) -> int:
        if not hasattr(self.source, "__len__"):
            raise TypeError("this stream's source has no length")
        n = len(self.source)  # type: ignore[arg-type]
        if self.batch_size is None:
            return self.epochs * n
        if isinstance(self.source, _MapDataset):
            per_epoch = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
            return self.epochs * per_epoch
        raise TypeError("the number of re-batched batches of this source is not known in advance")

    def __iter__(self) -> Iterator[Batch]:
        for _ in range(self.epochs):
            yield from self._one_pass()

    def _one_pass(self) -> Iterator[Batch]:
        pending_x: list[torch.Tensor] = []
        pending_y: list[torch.Tensor] = []
        count = 0
        for item in self.source:
            x, y = _as_pair(item)
            if y.dim() == 0:
                x, y = x.unsqueeze(0), y.unsqueeze(0)
            if self.batch_size is None:
                yield x, y
                continue
            pending_x.append(x)
            pending_y.append(y)
            count += y.shape[0]
            while count >= self.batch_size:
                xs, ys = torch.cat(pending_x), torch.cat(pending_y)
                yield xs[: self.batch_size], ys[: self.batch_size]
                pending_x, pending_y = [xs[self.batch_size :]], [ys[self.batch_size :]]
                count -= self.batch_size
        if count and not self.drop_last:
            yield torch.cat(pending_x), torch.cat(pending_y)

    def __repr__(self) -> str:
        return f"IterableStream(source={type(self.source).__name__}, batch_size={self.batch_size})"


def _is_array(value: Any) -> bool:
    return isinstance(value, torch.Tensor | np.ndarray)


def as_stream(
    obj: Any,
    *,
    batch_size: int | None = None,
    shuffle: bool = False,
    seed: int | None = None,
    drop_last: bool = False,
    epochs: int = 1,
) -> Stream | IterableStream:
    """Turn a data source into a stream of batched ``(x, y)`` tensors.

    Accepted sources:

    - a :class:`Stream` or :class:`IterableStream`: returned unchanged when no option is given;
    - a :class:`TensorData`, or an ``(x, y)`` tuple of tensors/arrays (``y`` 1-D: a dataset; ``y`` a
      scalar: one sample) -> :class:`Stream` (``batch_size`` default 1, ``shuffle`` supported);
    - a map-style ``torch.utils.data.Dataset`` yielding ``(x, y)`` -> batched by ``batch_size`` (default
      one sample at a time), ``shuffle`` supported;
    - a ``DataLoader``, an ``IterableDataset`` or any iterable of ``(x, y)`` pairs (single samples or
      batches) -> :class:`IterableStream`; batches pass through when ``batch_size`` is None. These cannot
      be shuffled here (shuffle the DataLoader itself).

    Inputs are converted to float32 and labels to int64. Anything else raises
    :class:`~ondevice.errors.ConfigError` naming what was given and what is accepted.
    """
    _check_common(batch_size, epochs)
    no_options = batch_size is None and not shuffle and seed is None and not drop_last and epochs == 1
    if isinstance(obj, Stream | IterableStream):
        if no_options:
            return obj
        if isinstance(obj, Stream):
            return Stream(
                obj.data,
                batch_size=batch_size or obj.batch_size,
                shuffle=shuffle,
                seed=seed,
                drop_last=drop_last,
                epochs=epochs,
            )
        obj = obj.source
    if isinstance(obj, tuple) and len(obj) == 2 and _is_array(obj[0]) and _is_array(obj[1]):
        x, y = _to_x(obj[0]), _to_y(obj[1])
        if y.dim() == 0:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        x, y = _as_pair((x, y))
        obj = TensorData(x, y)
    if isinstance(obj, TensorData):
        return Stream(
            obj, batch_size=batch_size or 1, shuffle=shuffle, seed=seed, drop_last=drop_last, epochs=epochs
        )
    rejected = (str, bytes, bytearray, Mapping, torch.Tensor, np.ndarray)
    if obj is None or isinstance(obj, rejected) or not isinstance(obj, Iterable | Dataset):
        raise ConfigError(f"as_stream cannot stream a {type(obj).__name__}; it accepts {_ACCEPTED}")
    is_map_dataset = (
        isinstance(obj, Dataset) and not isinstance(obj, IterableDataset) and hasattr(obj, "__len__")
    )
    if is_map_dataset:
        source: Iterable[Any] = _MapDataset(obj, shuffle=shuffle, seed=seed)
    else:
        if shuffle:
            hint = (
                " set shuffle=True on the DataLoader" if isinstance(obj, DataLoader) else " shuffle it first"
            )
            raise ConfigError(f"as_stream cannot shuffle a {type(obj).__name__} (a sequential source);{hint}")
        source = obj  # type: ignore[assignment]  # a sequential source is iterable
    return IterableStream(source, batch_size=batch_size, drop_last=drop_last, epochs=epochs)
