"""Memory-saving Linear.

For ``y = x W^T + b``: ``dx = dy W`` needs only the weight, ``dW = dy^T x`` needs the input and
``db = sum(dy)`` needs nothing, so the input is needed only when the weight trains (TinyTL, Cai et al.
2020, Sec. 2). Stock autograd already realises this for ``F.linear``: ``addmm``/``mm``/``bmm`` save the
input only when the weight's gradient is wanted (their derivative formulas each use one operand, and
autograd's generated code saves an operand only if the other one requires grad). So this layer runs stock
``F.linear`` (no Python autograd Function, no overhead, stock gradients) and exists so that ``convert``
accounts for Linear layers. :func:`linear_backward` computes the products in the order stock autograd's
``AddmmBackward0`` uses (``mm_mat1_backward``/``mm_mat2_backward``), for ops built on a linear map
(``partial``), so their gradients match stock PyTorch bit for bit.
"""

from __future__ import annotations

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


class MemorySavingLinear(MemorySavingModule, nn.Linear):
    """``nn.Linear`` keeping its input for backward only when its weight trains (as stock autograd does)."""

    stock_type = nn.Linear

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


register_op(nn.Linear, MemorySavingLinear.from_module)
