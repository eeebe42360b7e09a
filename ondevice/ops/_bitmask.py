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

The ReLU family's hot path never materialises a float mask: :func:`masked_grad` computes stock's
``threshold_backward(grad, mask, 0)`` (``grad`` where the mask is 1, ``+0`` elsewhere) as an *integer*
multiply of the gradient's bit pattern by the 0/1 mask (``bits * 1 = bits``, ``bits * 0`` is the pattern
of ``+0.0``), one numpy pass that reads the 1-byte mask unpacked straight from the bits, so it is exact
for every value, ``inf`` and ``NaN`` included. ATen's comparison and ``where`` kernels into or out of
``bool`` are several times slower than numpy's on CPU, which is why the masks are built and read there.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ondevice.ops.registry import MaskMode

__all__ = [
    "decode_mask",
    "encode_mask",
    "mask_nbytes",
    "masked_grad",
    "numpy_fast_path",
    "pack_bits",
    "shape_only",
    "unpack_bits",
]

_PACK = 0x0102040810204080
_SPREAD = 0x0101010101010101
_SELECT = 0x8040201008040201 - (1 << 64)  # as a signed int64
_ROUND = 0x7F7F7F7F7F7F7F7F
_TABLES: dict[torch.dtype, Tensor] = {}
# Float dtypes numpy can read, and the same-width integer dtype whose bit pattern masked_grad multiplies.
_INT_VIEW: dict[torch.dtype, torch.dtype] = {
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
# The same, numpy-side: a gradient's numpy dtype -> the integer dtype its bits are multiplied as.
_NUMPY_INT_VIEW = {
    np.dtype(np.float16): np.int16,
    np.dtype(np.float32): np.int32,
    np.dtype(np.float64): np.int64,
}


def _table(dtype: torch.dtype) -> Tensor:
    """Row ``p`` holds the 8 bits of ``p`` (least significant first) as 0/1 values of ``dtype``."""
    table = _TABLES.get(dtype)
    if table is None:
        bits = torch.arange(256).unsqueeze(1).bitwise_right_shift(torch.arange(8)).bitwise_and(1)
        table = _TABLES[dtype] = bits.to(dtype)
    return table


def shape_only(t: Tensor) -> bool:
    """Whether ``t`` stands in for a CPU tensor without values (``memory.estimate``'s fake tensors, meta).

    Such tensors take the shape-only path: they allocate exactly what the numpy fast path hands to torch
    (the kept mask, the masked gradient) and nothing more, so an estimate matches a measurement.
    """
    from torch._subclasses.fake_tensor import is_fake

    return t.is_meta or (is_fake(t) and t.device.type == "cpu")


def _plain_cpu(t: Tensor) -> bool:
    return type(t) is Tensor and t.is_cpu


def numpy_fast_path(t: Tensor) -> bool:
    """Whether ``t`` is a plain CPU float tensor numpy can view (float16/32/64, any strides)."""
    return _plain_cpu(t) and t.dtype in _INT_VIEW and t.layout == torch.strided and not t.is_conj()


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


def masked_grad(grad_out: Tensor, stored: Tensor, shape: torch.Size, mode: MaskMode) -> Tensor:
    """``grad_out`` where the kept mask is 1 and ``+0`` where it is 0, shaped ``shape``.

    Bit for bit what stock ``threshold_backward(grad_out, mask, 0)`` returns for a 0/1 ``mask``; on plain
    CPU tensors one numpy pass (see the module docstring), elsewhere that ATen kernel itself.
    """
    grad_enabled = torch.is_grad_enabled()
    if not grad_enabled and numpy_fast_path(grad_out) and _plain_cpu(stored):  # the hot path first
        if mode == "bit":
            keep = np.unpackbits(stored.numpy(), count=shape.numel(), bitorder="little").reshape(shape)
        else:
            keep = stored.numpy()
        bits = grad_out.detach().numpy()
        grad_bits = np.multiply(bits.view(_NUMPY_INT_VIEW[bits.dtype]), keep)  # bit patterns times 0 or 1
        # ``detach``: one cheap ATen op (``view(shape)`` costs several times more), so that ``memory``'s
        # live-tensor tracker sees the new storage.
        return torch.from_numpy(grad_bits.view(bits.dtype)).detach()
    if not grad_enabled and shape_only(grad_out):
        return torch.empty(shape, dtype=grad_out.dtype, device=grad_out.device)
    # Double backward, or tensors numpy cannot read: stock's kernel on the decoded mask.
    mask = decode_mask(stored, shape, mode, grad_out.dtype)
    return torch.ops.aten.threshold_backward.default(grad_out, mask, 0)


def decode_mask(stored: Tensor, shape: torch.Size, mode: MaskMode, dtype: torch.dtype) -> Tensor:
    """The kept mask as a tensor of 0s and 1s of ``shape`` and ``dtype``.

    On plain CPU tensors numpy unpacks the bits (no lookup table to build on first use, which would
    otherwise show up in the first measured step); fake tensors allocate the same two tensors.
    """
    if mode == "bit":
        if shape_only(stored):
            return torch.empty(shape, dtype=torch.uint8, device=stored.device).to(dtype)
        if _plain_cpu(stored):
            keep = np.unpackbits(stored.numpy(), count=shape.numel(), bitorder="little")
            return torch.from_numpy(keep).view(shape).to(dtype)
        return unpack_bits(stored, shape.numel(), dtype).view(shape)
    return stored.to(dtype)
