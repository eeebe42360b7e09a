"""Memory-saving Conv1d/Conv2d/Conv3d (dense, grouped and depthwise).

The gradients of a convolution ``y = W * x + b`` are ``dx = W^T * dy`` (needs only the weight),
``dW = dy * x`` (needs the input) and ``db = sum(dy)`` (needs nothing). Stock autograd keeps ``x`` whenever
anything requires grad; this op keeps it only when the weight trains (TinyTL, Cai et al. 2020, Sec. 2:
"the weight update needs the input activation, the bias update does not"). Backward calls the very ATen
kernel stock autograd calls (``aten.convolution_backward``), with an uninitialised placeholder for the input
when only its shape is needed (see ``placeholder``), so gradients are bit-identical.

Where this op would keep what stock keeps anyway (the weight trains, so the input must be kept) or nothing
needs a gradient at all, the layer runs stock ``F.conv*d`` and skips the Python autograd Function, whose
per-call overhead is the price of the saving.

Subclasses that keep ``forward`` and ``_conv_forward`` (transformers' ``EfficientNetDepthwiseConv2d``) get
these ops; timm's ``Conv2dSame`` (TensorFlow ``'SAME'`` padding computed per input, then a convolution
without padding) has its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ondevice.ops.placeholder import memory_format_of, shape_placeholder
from ondevice.ops.registry import MemorySavingModule, register_op

__all__ = ["MemorySavingConv1d", "MemorySavingConv2d", "MemorySavingConv3d", "conv_forward", "pad_same"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVOLUTION_BACKWARD = torch.ops.aten.convolution_backward.default


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        conv_args: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int],
    ) -> Tensor:
        ctx.conv_args, ctx.x_shape, ctx.x_format = conv_args, x.shape, memory_format_of(x)
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return _CONV[x.dim() - 2](x, weight, bias, *conv_args)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        if x is None:
            x = shape_placeholder(ctx.x_shape, grad_out, ctx.x_format)
        stride, padding, dilation, groups = ctx.conv_args
        grad_x, grad_w, grad_b = _CONVOLUTION_BACKWARD(
            grad_out, x, weight, ctx.bias_shape, stride, padding, dilation, False,
            [0] * len(stride), groups, list(ctx.needs_input_grad[:3]),
        )  # fmt: skip
        return grad_x, grad_w, grad_b, None


def resolve_padding(conv: nn.modules.conv._ConvNd, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Apply non-zero padding modes and asymmetric ``'same'`` padding to ``x``; return the symmetric rest.

    Mirrors ``nn.Conv*d._conv_forward`` and ATen's ``_convolution_same`` so outputs match stock exactly.
    """
    nd = x.dim() - 2
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return x, (0,) * nd
    if conv.padding == "valid":
        return x, (0,) * nd
    if conv.padding == "same":
        left, extra = [], [0] * (2 * nd)
        for i in range(nd):
            total = conv.dilation[i] * (conv.kernel_size[i] - 1)
            left.append(total // 2)
            extra[2 * (nd - 1 - i) + 1] = total - total // 2 - total // 2
        if any(extra):
            x = F.pad(x, extra)
        return x, tuple(left)
    return x, tuple(conv.padding)  # type: ignore[arg-type]


def conv_forward(conv: nn.modules.conv._ConvNd, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv``'s forward through the memory-saving op, with the given weight and bias.

    Runs stock ``conv._conv_forward`` when the op would keep what stock keeps: the weight trains (its
    gradient needs the input), or nothing needs a gradient.
    """
    if weight.requires_grad or not (x.requires_grad or (bias is not None and bias.requires_grad)):
        return conv._conv_forward(x, weight, bias)  # type: ignore[operator]
    x, padding = resolve_padding(conv, x)
    return _ConvFn.apply(x, weight, bias, (conv.stride, padding, conv.dilation, conv.groups))


class _ConvMixin(MemorySavingModule):
    relies_on = ("forward", "_conv_forward")

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)  # type: ignore[safe-super]
        return conv_forward(self, x, self.weight, self.bias)  # type: ignore[arg-type]


class MemorySavingConv1d(_ConvMixin, nn.Conv1d):
    """``nn.Conv1d`` that keeps its input for backward only when its weight trains."""

    stock_type = nn.Conv1d


class MemorySavingConv2d(_ConvMixin, nn.Conv2d):
    """``nn.Conv2d`` that keeps its input for backward only when its weight trains."""

    stock_type = nn.Conv2d


class MemorySavingConv3d(_ConvMixin, nn.Conv3d):
    """``nn.Conv3d`` that keeps its input for backward only when its weight trains."""

    stock_type = nn.Conv3d


def pad_same(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """TensorFlow's ``'SAME'`` padding of ``x`` for a 2d convolution, as timm's ``pad_same`` computes it."""
    ih, iw = x.size()[-2:]
    pad_h = max((math.ceil(ih / stride[0]) - 1) * stride[0] + (kernel_size[0] - 1) * dilation[0] + 1 - ih, 0)
    pad_w = max((math.ceil(iw / stride[1]) - 1) * stride[1] + (kernel_size[1] - 1) * dilation[1] + 1 - iw, 0)
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0)


class _Conv2dSameOp(MemorySavingModule):
    """timm ``Conv2dSame``: dynamic ``'SAME'`` padding (which keeps nothing), then the conv op, no padding."""

    library_layer = "timm.layers.conv2d_same.Conv2dSame"

    def forward(self, x: Tensor) -> Tensor:
        conv: Any = self
        weight, bias = conv.weight, conv.bias
        if (
            not torch.is_grad_enabled()
            or weight.requires_grad
            or not (x.requires_grad or (bias is not None and bias.requires_grad))
        ):
            return super().forward(x)  # type: ignore[safe-super]
        x = pad_same(x, weight.shape[-2:], conv.stride, conv.dilation)
        return _ConvFn.apply(x, weight, bias, (conv.stride, (0, 0), conv.dilation, conv.groups))


for _cls in (MemorySavingConv1d, MemorySavingConv2d, MemorySavingConv3d):
    register_op(_cls.stock_type, _cls.from_module, relies_on=_cls.relies_on)

# Fingerprints of the library source the op mirrors (see registry.source_fingerprint); a test checks it.
register_op(
    _Conv2dSameOp.library_layer,
    _Conv2dSameOp.from_module,
    fingerprint="bc5e964f01ab9436",
    also=(
        "timm.layers.conv2d_same.conv2d_same",
        "timm.layers.padding.pad_same",
        "timm.layers.padding.get_same_padding",
    ),
    written_for="timm 1.0.31",
)
