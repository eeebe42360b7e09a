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

timm's ``Linear`` (``F.linear`` in eager mode) and transformers' ``Conv1D`` (``addmm`` with the weight
transposed, for which stock autograd saves the same way) are supported the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ondevice.ops.registry import MemorySavingModule, register_op

__all__ = ["MemorySavingLinear", "compact_if_pinning", "linear_backward"]


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


def compact_if_pinning(x: Tensor) -> Tensor:
    """``x``, or a compact copy of it when ``x`` is a view using at most half of its storage.

    What autograd keeps is a tensor, and a view keeps its whole storage alive: a classifier on the CLS
    token (``hidden[:, 0]``, as transformers' ViT and timm's ViT call their head) would keep the whole
    sequence's hidden states for a weight gradient that needs one token of them. A copy of the view is
    the same values (so the same gradients, bit for bit) and frees the rest for reuse.
    """
    if x.untyped_storage().nbytes() >= 2 * x.numel() * x.element_size():
        return x.clone(memory_format=torch.contiguous_format)
    return x


class MemorySavingLinear(MemorySavingModule, nn.Linear):
    """``nn.Linear`` keeping its input for backward only when its weight trains (as stock autograd does),
    and then never more of it than it uses (:func:`compact_if_pinning`)."""

    stock_type = nn.Linear

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.requires_grad and torch.is_grad_enabled():
            x = compact_if_pinning(x)
        return F.linear(x, self.weight, self.bias)


class _TimmLinearOp(MemorySavingLinear):
    """timm ``Linear``: in eager mode (not TorchScript) its forward is ``F.linear``, as this layer's."""

    library_layer = "timm.layers.linear.Linear"


class _Conv1DOp(MemorySavingModule):
    """transformers ``Conv1D`` (GPT-2's linear layer with a transposed weight) running its own forward.

    Its forward is ``addmm(bias, x2d, weight)``, for which stock autograd keeps ``x2d`` only when the
    weight trains (and the weight, a parameter, only when the input needs a gradient): already what the
    gradients need, so this op keeps the library's forward, and exists so that the layer is supported.
    """

    library_layer = "transformers.pytorch_utils.Conv1D"


register_op(nn.Linear, MemorySavingLinear.from_module)
# Fingerprints of the library source each op mirrors (see registry.source_fingerprint); a test checks them.
register_op(
    _TimmLinearOp.library_layer,
    _TimmLinearOp.from_module,
    fingerprint="013eab517bd7cd26",
    written_for="timm 1.0.31",
)
register_op(
    _Conv1DOp.library_layer,
    _Conv1DOp.from_module,
    fingerprint="15571302abfb15cd",
    written_for="transformers 5.25.0",
)
