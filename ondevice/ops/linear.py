"""Memory-saving Linear.

For ``y = x W^T + b``: ``dx = dy W`` needs only the weight, ``dW = dy^T x`` needs the input and
``db = sum(dy)`` needs nothing, so the input is kept only when the weight trains (TinyTL, Cai et al.
2020, Sec. 2). The products are computed in the order stock autograd's ``AddmmBackward0`` uses
(``mm_mat1_backward``/``mm_mat2_backward``), so gradients match stock PyTorch bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ondevice.ops.registry import MemorySavingModule, register_op

__all__ = ["MemorySavingLinear", "linear_backward"]


def linear_backward(
    grad_out: Tensor,
    x: Tensor | None,
    weight: Tensor,
    x_shape: torch.Size,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``F.linear`` w.r.t. input, weight and bias, as stock autograd computes them.

    ``x`` may be ``None`` when the weight gradient is not needed.
    """
    grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x = grad_w = grad_b = None
    if needs[0]:
        grad_x = grad_2d.mm(weight).view(x_shape)
    if needs[1]:
        assert x is not None  # kept by forward whenever the weight needs a gradient
        grad_w = grad_2d.t().mm(x.reshape(-1, x.shape[-1]))
    if needs[2]:
        grad_b = grad_2d.sum(0)
    return grad_x, grad_w, grad_b


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.x_shape = x.shape
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return linear_backward(grad_out, x, weight, ctx.x_shape, needs)


class MemorySavingLinear(MemorySavingModule, nn.Linear):
    """``nn.Linear`` that keeps its input for backward only when its weight trains."""

    stock_type = nn.Linear

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        return _LinearFn.apply(x, self.weight, self.bias)


register_op(nn.Linear, MemorySavingLinear.from_module)
