"""Samples from a table on disk: a ``.csv`` or ``.npy`` file with one sample per row, the label last."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ondevice.data.tensordata import TensorData
from ondevice.errors import ConfigError

__all__ = ["load_table"]


def load_table(path: str | os.PathLike[str], *, input_shape: tuple[int, ...] | None = None) -> TensorData:
    """Samples from a ``.csv`` (comma-separated, optional non-numeric header line) or ``.npy`` (2-D
    array) file: the last column is the integer label, the other columns are the features, one sample per
    row. ``input_shape`` reshapes the features (e.g. ``(1, 64)`` for ``cnn1d``, ``(1, 8, 8)`` for ``cnn``);
    by default they become a 1-channel series ``(1, F)``."""
    source = Path(path)
    if not source.exists():
        raise ConfigError(f"data file {str(source)!r} does not exist")
    suffix = source.suffix.lower()
    try:
        if suffix == ".npy":
            table = np.load(source, allow_pickle=False)
        elif suffix == ".csv":
            with source.open() as handle:
                first = handle.readline()
            has_header = any(c.isalpha() for c in first.replace("e", "").replace("E", ""))
            table = np.loadtxt(source, delimiter=",", skiprows=1 if has_header else 0, ndmin=2)
        else:
            raise ConfigError(f"data file must be .csv or .npy, got {source.name!r}")
    except ValueError as exc:
        raise ConfigError(f"cannot read {str(source)!r} as a numeric table: {exc}") from None
    except (OSError, EOFError) as exc:  # a directory, no permission, a truncated .npy
        raise ConfigError(
            f"cannot read {str(source)!r} ({type(exc).__name__}: {exc}); pass a readable .csv or .npy file"
        ) from None
    if table.ndim != 2 or table.shape[1] < 2 or table.shape[0] < 1:
        raise ConfigError(
            f"{str(source)!r} must be a 2-D table with feature columns and a last label column, got shape "
            f"{table.shape}"
        )
    features, labels = table[:, :-1].astype(np.float32), table[:, -1]
    if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)) or labels.min() < 0:
        raise ConfigError(f"the last column of {str(source)!r} must hold integer labels >= 0")
    shape = input_shape or (1, features.shape[1])
    if int(np.prod(shape)) != features.shape[1]:
        raise ConfigError(
            f"{features.shape[1]} feature columns cannot be reshaped to the model's input shape {shape}"
        )
    x = torch.from_numpy(features).reshape(-1, *shape).contiguous()
    return TensorData(x, torch.from_numpy(labels.astype(np.int64)))
