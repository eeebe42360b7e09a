"""Masks kept for backward: packed 8 elements per byte, or one byte per element.

Bit ``i`` of packed byte ``j`` holds element ``8 j + i`` (numpy's ``bitorder="little"``); the last byte
is zero-padded. On plain CPU tensors packing runs numpy's ``packbits`` (one vectorised pass, several
times faster than any chain of ATen ops) into a tensor allocated by torch, and unpacking is one
``index_select`` into a 256-row table of eight 0/1 values in the gradient's dtype (a same-dtype kernel is
faster than a mixed one, which casts internally). On other tensors (fake or meta tensors, as
``memory.estimate`` uses, or other devices) both run as elementwise 64-bit arithmetic on the byte
view: eight 0/1 bytes read as one little-endian int64 ``v`` pack to ``(v * 0x0102040810204080) >> 56``
(every product bit lands in a distinct position, so no carry reaches the top byte), and a packed byte
``p`` unpacks to ``((p * 0x0101..01) & 0x8040201008040201) + 0x7F..7F >> 7 & 0x0101..01``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ondevice.ops.registry import MaskMode

__all__ = ["decode_mask", "encode_mask", "mask_nbytes", "pack_bits", "unpack_bits"]

_PACK = 0x0102040810204080
_SPREAD = 0x0101010101010101
_SELECT = 0x8040201008040201 - (1 << 64)  # as a signed int64
_ROUND = 0x7F7F7F7F7F7F7F7F
_TABLES: dict[torch.dtype, Tensor] = {}


def _table(dtype: torch.dtype) -> Tensor:
    """Row ``p`` holds the 8 bits of ``p`` (least significant first) as 0/1 values of ``dtype``."""
    table = _TABLES.get(dtype)
    if table is None:
        bits = torch.arange(256).unsqueeze(1).bitwise_right_shift(torch.arange(8)).bitwise_and(1)
        table = _TABLES[dtype] = bits.to(dtype)
    return table


def _plain_cpu(t: Tensor) -> bool:
    return type(t) is Tensor and t.is_cpu


def mask_nbytes(numel: int, mode: MaskMode) -> int:
    """Bytes a mask of ``numel`` elements keeps: ``ceil(numel / 8)`` packed, ``numel`` as bytes."""
    return (numel + 7) // 8 if mode == "bit" else numel


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a bool tensor (read in logical order) into ``ceil(numel / 8)`` uint8 bytes."""
    return _pack_numpy(mask) if _plain_cpu(mask) else _pack_arith(mask)


def unpack_bits(packed: Tensor, numel: int, dtype: torch.dtype = torch.uint8) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` elements as a flat tensor of 0s and 1s."""
    return _unpack_table(packed, numel, dtype) if _plain_cpu(packed) else _unpack_arith(packed, numel, dtype)


def _pack_numpy(mask: Tensor) -> Tensor:
    out = torch.empty((mask.numel() + 7) // 8, dtype=torch.uint8)
    out.numpy()[:] = np.packbits(mask.numpy().reshape(-1), bitorder="little")
    return out


def _pack_arith(mask: Tensor) -> Tensor:
    flat = mask.reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    return flat.view(torch.int64).mul(_PACK).bitwise_right_shift_(56).to(torch.uint8)


def _unpack_table(packed: Tensor, numel: int, dtype: torch.dtype) -> Tensor:
    return _table(dtype).index_select(0, packed.long()).view(-1)[:numel]


def _unpack_arith(packed: Tensor, numel: int, dtype: torch.dtype) -> Tensor:
    spread = packed.to(torch.int64).mul_(_SPREAD).bitwise_and_(_SELECT)
    spread.add_(_ROUND).bitwise_right_shift_(7).bitwise_and_(_SPREAD)
    return spread.view(torch.uint8)[:numel].to(dtype)


def encode_mask(mask: Tensor, mode: MaskMode) -> Tensor:
    """What to keep of a bool mask: its packed bits, or the bool bytes themselves."""
    return pack_bits(mask) if mode == "bit" else mask


def decode_mask(stored: Tensor, shape: torch.Size, mode: MaskMode, dtype: torch.dtype) -> Tensor:
    """The kept mask as a tensor of 0s and 1s of ``shape`` and ``dtype``."""
    if mode == "bit":
        return unpack_bits(stored, shape.numel(), dtype).view(shape)
    return stored.to(dtype)
