"""Memory-saving Dropout: keeps the keep-mask packed 1 bit per element.

Stock ``torch.dropout`` on CPU draws ``noise = bernoulli(1 - p) / (1 - p)`` and keeps that float tensor
(32 bits per element) for ``dx = dy * noise``. This op draws the very same noise (same generator calls,
so a seeded run gives identical outputs) and keeps only where it is non-zero, as a 1-bit (or 1-byte)
mask, plus the scalar ``1 / (1 - p)``, from which backward rebuilds the noise and computes stock's
``dx = dy * noise`` bit for bit (Srivastava et al., JMLR 2014, for the inverted-dropout scaling).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ondevice.ops._bitmask import decode_mask, encode_mask
from ondevice.ops.registry import MaskMode, MemorySavingModule, register_op

__all__ = ["MemorySavingDropout"]


class _DropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, p: float, inplace: bool, mode: MaskMode) -> Tensor:  # type: ignore[override]
        noise = torch.empty_like(x).bernoulli_(1 - p)
        noise.div_(1 - p)
        ctx.shape, ctx.mode = x.shape, mode
        if ctx.needs_input_grad[0]:
            scale = noise.new_ones(()).div_(1 - p)
            ctx.save_for_backward(encode_mask(noise.bool(), mode), scale)
        if inplace:
            ctx.mark_dirty(x)
            return x.mul_(noise)
        return x * noise

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        stored, scale = ctx.saved_tensors
        noise = decode_mask(stored, ctx.shape, ctx.mode, grad_out.dtype).mul_(scale)
        return grad_out * noise, None, None, None


class MemorySavingDropout(MemorySavingModule, nn.Dropout):
    """``nn.Dropout`` keeping a 1-bit (or 1-byte) mask for backward."""

    stock_type = nn.Dropout
    shown_options = ("mask",)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled() and 0.0 < self.p < 1.0):
            return super().forward(x)
        return _DropoutFn.apply(x, float(self.p), self.inplace, self.op_options.mask)


register_op(nn.Dropout, MemorySavingDropout.from_module)
