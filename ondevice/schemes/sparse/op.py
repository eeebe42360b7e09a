"""Memory-saving op for :class:`ondevice.schemes.sparse.layers.PartialChannelUpdate`.

When only the weight columns of input channels ``S`` train (tiny-training's sparse channel update, Lin et
al. 2022, Sec. 3.2), ``dW[:, S] = dy * x[:, S]`` needs only those input channels, so this op keeps
``x[:, S]`` (a ``|S| / C`` fraction of the input) where stock autograd keeps the whole input and the
assembled weight. The input gradient uses the assembled weight, re-assembled in backward from the two
parameters instead of being kept. The frozen base weight gets a gradient only if a caller unfreezes it
(then the whole input is kept). Gradients equal stock PyTorch's to float rounding (the weight gradient is
one GEMM over fewer columns, which may sum in a different order).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ondevice.ops.conv import _CONV, resolve_padding
from ondevice.ops.linear import linear_backward
from ondevice.ops.placeholder import memory_format_of, shape_placeholder
from ondevice.ops.registry import MemorySavingModule, register_op
from ondevice.schemes.sparse.layers import PartialChannelUpdate

__all__ = ["MemorySavingPartialChannelUpdate"]


def _channel_dim(x: Tensor, conv_args: tuple[Any, ...] | None) -> int:
    return 1 if conv_args is not None else x.dim() - 1


class _PartialFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        base_weight: Tensor,
        weight_update: Tensor,
        bias: Tensor | None,
        index: Tensor,
        conv_args: tuple[Any, ...] | None,
    ) -> Tensor:
        weight = base_weight.index_copy(1, index, weight_update)
        dim = _channel_dim(x, conv_args)
        needs_base, needs_update = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if needs_base:
            kept = x
        elif needs_update:
            kept = x.index_select(dim, index)
        else:
            kept = None
        ctx.conv_args, ctx.x_shape, ctx.dim = conv_args, x.shape, dim
        ctx.x_format = memory_format_of(x)
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.save_for_backward(kept, base_weight, weight_update, index)
        if conv_args is None:
            return torch.nn.functional.linear(x, weight, bias)
        stride, padding, dilation, groups = conv_args
        return _CONV[x.dim() - 2](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        kept, base_weight, weight_update, index = ctx.saved_tensors
        needs_x, needs_base, needs_update, needs_b = ctx.needs_input_grad[:4]
        weight = base_weight.index_copy(1, index, weight_update)
        full_weight_grad = needs_base  # the whole input was kept
        grad_x = grad_w = grad_b = grad_update = None
        if ctx.conv_args is None:
            needs = (needs_x, False, needs_b)
            grad_x, _, grad_b = linear_backward(grad_out, None, weight, ctx.x_shape, needs)
            if needs_base or needs_update:
                _, grad_w, _ = linear_backward(grad_out, kept, weight, ctx.x_shape, (False, True, False))
        else:
            stride, padding, dilation, groups = ctx.conv_args
            n = len(stride)
            stand_in = shape_placeholder(ctx.x_shape, grad_out, ctx.x_format)
            grad_x, _, grad_b = torch.ops.aten.convolution_backward(
                grad_out, stand_in, weight, ctx.bias_shape, stride, padding,
                dilation, False, [0] * n, groups, [needs_x, False, needs_b],
            )  # fmt: skip
            if needs_base or needs_update:
                _, grad_w, _ = torch.ops.aten.convolution_backward(
                    grad_out, kept, weight if full_weight_grad else weight_update, None, stride, padding,
                    dilation, False, [0] * n, groups, [False, True, False],
                )  # fmt: skip
        grad_base = None
        if full_weight_grad:
            assert grad_w is not None  # computed above whenever the base weight needs a gradient
            grad_base = grad_w.index_fill(1, index, 0)
            grad_update = grad_w.index_select(1, index) if needs_update else None
        elif needs_update:
            grad_update = grad_w
        return grad_x, grad_base, grad_update, grad_b, None, None


class MemorySavingPartialChannelUpdate(MemorySavingModule, PartialChannelUpdate):
    """:class:`PartialChannelUpdate` that keeps only the trained input channels for backward."""

    stock_type = PartialChannelUpdate
    converts_children = False  # owns its frozen base layer, whose tensors the op uses directly

    def forward(self, x: Tensor) -> Tensor:
        base = self.base
        if not torch.is_grad_enabled():
            return super().forward(x)
        conv_args = None
        if not isinstance(base, nn.Linear):
            x, padding = resolve_padding(base, x)
            conv_args = (tuple(base.stride), padding, tuple(base.dilation), base.groups)
        return _PartialFn.apply(x, base.weight, self.weight_update, base.bias, self.channel_index, conv_args)


register_op(PartialChannelUpdate, MemorySavingPartialChannelUpdate.from_module)
