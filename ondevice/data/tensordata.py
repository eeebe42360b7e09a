"""``TensorData``: an in-memory labelled dataset held as two tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ondevice.errors import ConfigError

__all__ = ["TensorData"]


@dataclass(frozen=True, eq=False)
class TensorData:
    """Inputs ``x`` (float32, shape ``(N, ...)``) and integer labels ``y`` (int64, shape ``(N,)``).

    ``data[i]`` is the sample ``(x[i], y[i])``; indexing with a slice, a sequence or a tensor of indices
    (or a boolean mask) gives a new ``TensorData``. It is a valid ``torch.utils.data.Dataset``.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise ConfigError(
                f"TensorData needs tensors x and y, got x={type(self.x).__name__}, "
                f"y={type(self.y).__name__}; convert with torch.as_tensor"
            )
        if self.x.dtype != torch.float32:
            raise ConfigError(f"TensorData.x must be float32, got {self.x.dtype}; convert with x.float()")
        if self.y.dtype != torch.int64:
            raise ConfigError(f"TensorData.y must be int64, got {self.y.dtype}; convert with y.long()")
        if self.y.dim() != 1:
            raise ConfigError(
                f"TensorData.y must be 1-D (one label per sample), got shape {tuple(self.y.shape)}"
            )
        if self.x.dim() < 1 or self.x.shape[0] != self.y.shape[0]:
            raise ConfigError(
                f"TensorData.x and y must have the same length, got {self.x.shape[0] if self.x.dim() else 0} "
                f"inputs and {self.y.shape[0]} labels"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(
        self, index: int | slice | Sequence[int] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | TensorData:
        if isinstance(index, int) or (isinstance(index, torch.Tensor) and index.dim() == 0):
            i = int(index)
            if not -len(self) <= i < len(self):
                raise IndexError(f"index {i} out of range for TensorData of length {len(self)}")
            return self.x[i], self.y[i]
        return self.subset(index)

    def subset(self, indices: slice | Sequence[int] | torch.Tensor) -> TensorData:
        """The samples at ``indices`` (a slice, a sequence or tensor of ints, or a boolean mask)."""
        if not isinstance(indices, slice):
            indices = torch.as_tensor(indices)
            if indices.dtype != torch.bool:
                indices = indices.long()
        return TensorData(self.x[indices], self.y[indices])

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-sample input shape."""
        return tuple(self.x.shape[1:])

    @property
    def classes(self) -> tuple[int, ...]:
        """The distinct labels present, sorted."""
        return tuple(int(c) for c in torch.unique(self.y).tolist())

    def map_labels(self, mapping: Mapping[int, int]) -> TensorData:
        """A copy whose labels are ``mapping[y]``; every present label must be a key of ``mapping``."""
        missing = [c for c in self.classes if c not in mapping]
        if missing:
            raise ConfigError(
                f"map_labels mapping has no entry for label(s) {missing}; it maps {sorted(mapping)}"
            )
        lut = torch.full((max(self.classes, default=0) + 1,), -1, dtype=torch.int64)
        for src, dst in mapping.items():
            if 0 <= int(src) < lut.numel():
                lut[int(src)] = int(dst)
        if (self.y < 0).any():
            raise ConfigError("map_labels needs non-negative labels")
        return TensorData(self.x, lut[self.y])

    def __repr__(self) -> str:
        return f"TensorData(n={len(self)}, shape={self.shape}, classes={self.classes})"
