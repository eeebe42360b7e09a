"""Lossy 8-bit compression of saved activations with a per-group offset and scale.

A tensor is flattened and cut into groups of :data:`GROUP_SIZE` elements; each group keeps its minimum
``lo`` and step ``scale = (max - min) / 255`` (float32) and each element the uint8 ``round((x - lo) /
scale)``. Reconstruction error is at most ``scale / 2`` per element, i.e. 1/510 of the group's range.
This is the activation compression of ActNN/GACT-style training (Chen et al., ICML 2021), used here only
for smooth activations, whose derivative needs the input itself; TinyTL keeps those at full precision.
At 128 elements per group the cost is 1 + 8/128 bytes per element instead of 4.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["GROUP_SIZE", "Compressed", "compress_int8", "compressed_nbytes", "decompress_int8"]

GROUP_SIZE = 128


class Compressed(NamedTuple):
    """An 8-bit compressed tensor: codes ``(groups, GROUP_SIZE)`` uint8, per-group ``lo`` and ``scale``."""

    codes: Tensor
    lo: Tensor
    scale: Tensor


def compressed_nbytes(numel: int) -> int:
    """Bytes :func:`compress_int8` keeps for ``numel`` elements."""
    groups = (numel + GROUP_SIZE - 1) // GROUP_SIZE
    return groups * GROUP_SIZE + 2 * 4 * groups


def compress_int8(x: Tensor) -> Compressed:
    """Compress ``x`` to 8 bits per element with a per-group offset and scale (see the module docstring)."""
    flat = x.detach().reshape(-1).float()
    numel = flat.numel()
    pad = (-numel) % GROUP_SIZE
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    groups = flat.view(-1, GROUP_SIZE)
    lo, hi = torch.aminmax(groups, dim=1, keepdim=True)
    scale = (hi - lo).div_(255.0).clamp_min_(torch.finfo(torch.float32).tiny)
    codes = (groups - lo).div_(scale).round_().clamp_(0, 255).to(torch.uint8)
    return Compressed(codes, lo, scale)


def decompress_int8(stored: Compressed, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """Reconstruct a tensor of ``shape`` and ``dtype`` from :func:`compress_int8`'s output."""
    values = torch.addcmul(stored.lo, stored.codes.to(torch.float32), stored.scale)
    return values.view(-1)[: shape.numel()].view(shape).to(dtype)
