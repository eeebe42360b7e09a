"""scikit-learn's shipped digits (1,797 8x8 grey images of 0-9) as a :class:`TensorData`, offline."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ondevice.data.tensordata import TensorData
from ondevice.errors import ConfigError

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "load_digits"]

#: Mean and standard deviation of all digit pixels after scaling 0..16 to [0, 1].
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760

Layout = Literal["image", "sequence"]


def _digits_file() -> Path | None:
    """scikit-learn's ``datasets/data/digits.csv.gz``, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 8, 8) in [0, 1] and labels (N,).

    The CSV that scikit-learn ships (64 pixels then the label per row) is read directly: importing
    ``sklearn.datasets`` costs ~2 s, which every simulated device would pay at start-up. Should the file
    move in a future scikit-learn, its public ``load_digits`` is used instead.
    """
    path = _digits_file()
    if path is not None:
        data = np.loadtxt(path, delimiter=",", dtype=np.float32)
        images, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    else:  # pragma: no cover - depends on scikit-learn's layout
        from sklearn.datasets import load_digits as sk_load_digits  # ships with scikit-learn, no download

        bunch = sk_load_digits()
        images, target = bunch.images.astype(np.float32), bunch.target.astype(np.int64)
    x = torch.as_tensor(images, dtype=torch.float32) / 16.0
    y = torch.as_tensor(target, dtype=torch.int64)
    return x, y


def load_digits(
    *,
    image_size: int | tuple[int, int] = 8,
    channels: int = 1,
    layout: Layout = "image",
    length: int | None = None,
    normalize: bool = True,
) -> TensorData:
    """Load the 1,797 digits with pixel values scaled from 0..16 to [0, 1].

    Args:
        image_size: side of the (square) images, or ``(height, width)``; other sizes than 8 are resized
            bilinearly.
        channels: number of channels; the grey channel is repeated (3 for RGB models).
        layout: ``"image"`` gives ``x`` of shape ``(N, channels, H, W)``; ``"sequence"`` turns each image
            into a 1-D time series ``(N, channels, H*W)`` by scanning it row by row (``(N, 1, 64)`` by
            default), for the 1-D CNN.
        length: for ``layout="sequence"`` only: resample each series linearly to this many steps.
        normalize: subtract :data:`DIGITS_MEAN` and divide by :data:`DIGITS_STD` (fixed constants, so
            every split is normalised the same way).

    Returns:
        A :class:`TensorData` with labels 0..9 in the dataset's original order.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ConfigError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ConfigError(f"channels must be a positive int (1 for grey, 3 for RGB models), got {channels!r}")
    if layout not in ("image", "sequence"):
        raise ConfigError(f"layout must be 'image' or 'sequence', got {layout!r}")
    if length is not None:
        if layout != "sequence":
            raise ConfigError("length applies to layout='sequence' only; use image_size for images")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ConfigError(f"length must be a positive int, got {length!r}")

    raw_x, raw_y = _raw_digits()
    x = raw_x.unsqueeze(1)  # (N, 1, 8, 8)
    if normalize:
        x = (x - DIGITS_MEAN) / DIGITS_STD
    if size != (8, 8):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if layout == "sequence":
        x = x.flatten(1).unsqueeze(1)  # row-major scan: (N, 1, H*W)
        if length is not None and length != x.shape[-1]:
            x = F.interpolate(x, size=length, mode="linear", align_corners=True)
    if channels != 1:
        x = x.expand(-1, channels, *x.shape[2:])
    return TensorData(x.contiguous().clone(), raw_y.clone())
