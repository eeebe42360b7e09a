"""Masks kept for backward: packed 8 elements per byte, or one byte per element.

Packing uses 64-bit multiply tricks on the byte view of a bool mask, so it runs as a few vectorised
elementwise ATen ops (and works on fake/meta tensors, which ``memory.estimate`` relies on):
eight 0/1 bytes ``b0..b7`` read as one little-endian int64 ``v`` pack to ``(v * 0x0102040810204080) >> 56``
(every product bit lands in a distinct position, so no carries disturb the top byte), and a packed byte
``p`` unpacks to ``((p * 0x0101010101010101) & 0x8040201008040201) + 0x7F..7F >> 7 & 0x0101010101010101``.
Both assume a little-endian host, which every platform torch supports is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ondevice.ops.registry import MaskMode

__all__ = ["decode_mask", "empty_mask", "encode_mask", "mask_nbytes", "pack_bits", "unpack_bits"]

_PACK = 0x0102040810204080
_SPREAD = 0x0101010101010101
_SELECT = 0x8040201008040201 - (1 << 64)  # as a signed int64
_ROUND = 0x7F7F7F7F7F7F7F7F


def mask_nbytes(numel: int, mode: MaskMode) -> int:
    """Bytes a mask of ``numel`` elements takes: ``ceil(numel / 8)`` packed, ``numel`` as bytes."""
    return (numel + 7) // 8 if mode == "bit" else numel


def empty_mask(like: Tensor, mode: MaskMode) -> tuple[Tensor, Tensor]:
    """A bool buffer to write a mask of ``like``'s shape into, and the view of it shaped like ``like``.

    In ``"bit"`` mode the buffer is padded with ``False`` to a multiple of 8 elements.
    """
    numel = like.numel()
    padded = (numel + 7) // 8 * 8 if mode == "bit" else numel
    buffer = torch.empty(padded, dtype=torch.bool, device=like.device)
    if padded != numel:
        buffer[numel:] = False
    return buffer, buffer[:numel].view(like.shape)


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a flat bool tensor whose length is a multiple of 8 into ``len / 8`` bytes (bit i = element i)."""
    packed = mask.view(torch.int64).mul(_PACK).bitwise_right_shift_(56)
    return packed.to(torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` elements as a uint8 tensor of 0s and 1s."""
    spread = packed.to(torch.int64).mul_(_SPREAD).bitwise_and_(_SELECT)
    spread.add_(_ROUND).bitwise_right_shift_(7).bitwise_and_(_SPREAD)
    return spread.view(torch.uint8)[:numel]


def encode_mask(buffer: Tensor, mode: MaskMode) -> Tensor:
    """What to keep of a mask buffer from :func:`empty_mask`: packed bits, or the bool bytes themselves."""
    return pack_bits(buffer) if mode == "bit" else buffer


def decode_mask(stored: Tensor, numel: int, mode: MaskMode) -> Tensor:
    """The kept mask as a flat uint8 tensor of 0s and 1s (multiply a gradient by it)."""
    if mode == "bit":
        return unpack_bits(stored, numel)
    return stored.view(torch.uint8)
