"""Lossy compression of what smooth activations keep for backward: 8-bit values or 2-bit derivative codes.

**8 bits** (``compress="int8"``). A tensor is flattened and cut into groups of :data:`GROUP_SIZE`
elements; each group keeps its minimum ``lo`` and step ``scale = (max - min) / 255`` (float32) and each
element the uint8 ``round((x - lo) / scale)``. Reconstruction error is at most ``scale / 2`` per element,
i.e. 1/510 of the group's range. This is the activation compression of ActNN/GACT-style training (Chen et
al., ICML 2021), used here only for smooth activations, whose derivative needs the input itself; TinyTL
keeps those at full precision. At 128 elements per group the cost is 1 + 8/128 bytes per element instead
of 4.

**2 bits** (``compress="2bit"``). The forward is computed exactly; only the backward is approximate. The
derivative ``f'`` is replaced by a step function with four levels, so each element keeps only which of
four intervals its input fell in (2 bits, four codes per byte): ReGELU2/ReSiLU2 (Chen et al.,
"Approximate and memory-sharing backpropagation", ICML 2024, arXiv 2406.16282). Backward is ``grad *
levels[code]``. The thresholds ``t1 < t2 < t3`` and levels ``l0..l3`` minimise the expected squared
derivative error ``E[(f'(X) - g(X))^2]`` for a standard normal input ``X`` (the pre-activations of a
normalised network). For fixed thresholds the best level of an interval is the conditional mean of ``f'``
there; for fixed levels a threshold is best where ``f'(t_i) = (l_{i-1} + l_i) / 2``. The constants below
come from alternating these two conditions (Lloyd's algorithm in the input domain, integrals by adaptive
quadrature) to convergence, started from the best triple of thresholds on a 0.05 grid (an exhaustive
search by cumulative sums), so they are the global optimum to the 6 digits given;
``tests/test_compress_2bit.py`` re-derives them. GELU, SiLU and Hardswish derivatives satisfy
``f'(-x) = 1 - f'(x)``, so their optimum is symmetric (``t2 = 0``, ``l3 = 1 - l0``). Sigmoid and Tanh
have even derivatives, so their codes index the interval of ``|x|`` (``on_magnitude``): four distinct
levels instead of two pairs. Root-mean-square derivative errors under ``N(0, 1)``: GELU 0.0894, GELU
(tanh form) 0.0895, SiLU 0.0889, Hardswish 0.110, Sigmoid 0.0123, Tanh 0.0705; ReGELU2's paper
derives its own constants for another objective, and these are ours. NaN inputs get code 0.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ondevice.ops._bitmask import numpy_fast_path, shape_only

__all__ = [
    "GROUP_SIZE",
    "STEP_DERIVATIVES",
    "Compressed",
    "StepDerivative",
    "compress_int8",
    "compressed_nbytes",
    "decompress_int8",
    "encode_2bit",
    "step_codes",
    "step_derivative",
    "step_grad",
    "two_bit_nbytes",
]

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


class StepDerivative(NamedTuple):
    """A derivative approximated by four levels: ``levels[i]`` where the input lies in interval ``i``.

    Interval ``i`` holds inputs with exactly ``i`` of ``thresholds`` below them (``x > t``), or, with
    ``on_magnitude``, ``|x|`` does.
    """

    thresholds: tuple[float, float, float]
    levels: tuple[float, float, float, float]
    on_magnitude: bool = False


#: The 2-bit derivatives of the smooth activations (derivation in the module docstring).
STEP_DERIVATIVES: dict[str, StepDerivative] = {
    "gelu": StepDerivative((-0.498962, 0.0, 0.498962), (-0.046386, 0.312675, 0.687325, 1.046386)),
    "gelu_tanh": StepDerivative((-0.499194, 0.0, 0.499194), (-0.046379, 0.312631, 0.687369, 1.046379)),
    "silu": StepDerivative((-0.668529, 0.0, 0.668529), (0.033595, 0.344526, 0.655474, 0.966405)),
    "hardswish": StepDerivative((-0.963940, 0.0, 0.963940), (0.006012, 0.351362, 0.648638, 0.993988)),
    "sigmoid": StepDerivative((0.690860, 1.176963, 1.750102), (0.241088, 0.203695, 0.156489, 0.095752), True),
    "tanh": StepDerivative((0.464689, 0.808375, 1.246312), (0.935561, 0.687904, 0.417796, 0.146552), True),
}

# Four 2-bit codes read as the bytes of one little-endian uint32 ``v`` pack to ``(v * _PACK4) >> 24``:
# code ``i`` lands on bits ``24 + 2 i`` and every cross term either overflows past bit 31 or sits on
# distinct bits below 24 (positions 6, 12, 14, 18, 20, 22), so no carry reaches the packed byte.
_PACK4 = np.uint32(0x01041040)
_CHUNK = 1 << 16  # codes per numpy pass (a multiple of 4): the scratch buffers stay in cache
_TABLES: dict[tuple[StepDerivative, torch.dtype, torch.device], Tensor] = {}


def two_bit_nbytes(numel: int) -> int:
    """Bytes :func:`encode_2bit` keeps for ``numel`` elements: ``ceil(numel / 4)``."""
    return (numel + 3) // 4


def step_codes(x: Tensor, step: StepDerivative) -> Tensor:
    """The interval index (0..3) of every element of ``x``, as uint8 (the reference, unpacked)."""
    values = x.abs() if step.on_magnitude else x
    codes = values.gt(step.thresholds[0]).to(torch.uint8)
    for threshold in step.thresholds[1:]:
        codes += values.gt(threshold)
    return codes


def step_derivative(x: Tensor, step: StepDerivative) -> Tensor:
    """``g(x)``, the step derivative at ``x``, in ``x``'s dtype (what backward multiplies the gradient by)."""
    levels = torch.tensor(step.levels, dtype=x.dtype, device=x.device)
    return levels[step_codes(x, step).long()]


def encode_2bit(x: Tensor, step: StepDerivative) -> Tensor:
    """``x``'s interval codes packed four per byte (code ``4 j + k`` in bits ``2k, 2k+1`` of byte ``j``)."""
    nbytes = two_bit_nbytes(x.numel())
    if numpy_fast_path(x):
        values = x.detach().numpy().reshape(-1)
        out = torch.empty(nbytes, dtype=torch.uint8)
        packed = out.numpy()
        buffer = np.zeros(min(_CHUNK, 4 * nbytes), dtype=np.uint8)
        scratch = np.empty(buffer.size, dtype=np.bool_)
        magnitude = np.empty(buffer.size, dtype=values.dtype) if step.on_magnitude else None
        for start in range(0, values.size, _CHUNK):
            chunk = values[start : start + _CHUNK]
            size = chunk.size
            if magnitude is not None:
                chunk = np.abs(chunk, out=magnitude[:size])
            np.greater(chunk, step.thresholds[0], out=buffer[:size].view(np.bool_))
            for threshold in step.thresholds[1:]:
                buffer[:size] += np.greater(chunk, threshold, out=scratch[:size]).view(np.uint8)
            if size % 4:
                buffer[size : size + 4 - size % 4] = 0
            words = buffer[: (size + 3) // 4 * 4].view("<u4")
            packed[start // 4 : start // 4 + words.size] = (words * _PACK4) >> 24
        # ``detach``: one cheap ATen op, so that ``memory``'s live-tensor tracker sees the storage.
        return out.detach()
    if shape_only(x):
        return torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    codes = step_codes(x.detach().reshape(-1), step)
    if codes.numel() % 4:
        codes = torch.cat([codes, codes.new_zeros(4 - codes.numel() % 4)])
    weights = torch.tensor([1, 4, 16, 64], dtype=torch.uint8, device=x.device)
    return codes.view(-1, 4).mul_(weights).sum(dim=1, dtype=torch.uint8)


def _table(step: StepDerivative, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Row ``p`` holds the levels of the four codes packed in byte ``p``, in ``dtype``."""
    key = (step, dtype, device)
    table = _TABLES.get(key)
    if table is None:
        codes = torch.arange(256).unsqueeze(1).bitwise_right_shift(torch.arange(0, 8, 2)).bitwise_and(3)
        levels = torch.tensor(step.levels, dtype=torch.float64)
        table = _TABLES[key] = levels[codes].to(dtype=dtype, device=device)
    return table


def step_grad(grad_out: Tensor, packed: Tensor, step: StepDerivative, shape: torch.Size) -> Tensor:
    """``grad_out * g(x)`` from :func:`encode_2bit`'s codes: the gradient through the step derivative."""
    numel = shape.numel()
    grad_out = grad_out.contiguous()
    if not torch.is_grad_enabled() and numpy_fast_path(grad_out) and type(packed) is Tensor and packed.is_cpu:
        out = torch.empty(shape, dtype=grad_out.dtype)
        grads, result = grad_out.numpy().reshape(-1), out.numpy().reshape(-1)
        table_np, codes = _table(step, grad_out.dtype, grad_out.device).numpy(), packed.numpy()
        factors = np.empty((min(_CHUNK, 4 * codes.size) // 4, 4), dtype=table_np.dtype)
        for start in range(0, numel, _CHUNK):
            size = min(_CHUNK, numel - start)
            rows = codes[start // 4 : (start + size + 3) // 4]
            # ``mode="clip"``: an unbuffered take (every code byte is a valid row anyway).
            looked_up = np.take(table_np, rows, axis=0, out=factors[: rows.size], mode="clip")
            looked_up = looked_up.reshape(-1)[:size]
            np.multiply(grads[start : start + size], looked_up, out=result[start : start + size])
        return out
    if not torch.is_grad_enabled() and shape_only(grad_out):
        return torch.empty(shape, dtype=grad_out.dtype, device=grad_out.device)
    levels = _table(step, grad_out.dtype, grad_out.device)
    multipliers = levels.index_select(0, packed.long()).view(-1)[:numel].view(shape)
    return grad_out * multipliers
