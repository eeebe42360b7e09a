"""Memory-saving pooling: AvgPool, MaxPool and AdaptiveAvgPool, 1d and 2d.

Average pooling is linear, so its backward needs only the input's *shape*; stock autograd keeps the whole
input. Max pooling needs only which element won each window: stock keeps the input and int64 indices,
this op keeps the indices alone, as int32. The 1d variants run as 2d pooling over an inserted unit
dimension, as ATen implements them. ``AdaptiveAvgPool`` to a single output (global pooling) is a mean,
for which stock autograd already keeps nothing; it runs as stock. Backward calls the ATen kernels stock
autograd calls, with an uninitialised placeholder for the input, so gradients are bit-identical.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.utils import _pair

from ondevice.ops.placeholder import memory_format_of, shape_placeholder
from ondevice.ops.registry import MemorySavingModule, register_op

__all__ = [
    "MemorySavingAdaptiveAvgPool1d",
    "MemorySavingAdaptiveAvgPool2d",
    "MemorySavingAvgPool1d",
    "MemorySavingAvgPool2d",
    "MemorySavingMaxPool1d",
    "MemorySavingMaxPool2d",
]


class _AvgPool2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, args: tuple[Any, ...]) -> Tensor:  # type: ignore[override]
        ctx.x_shape, ctx.x_format, ctx.args = x.shape, memory_format_of(x), args
        return F.avg_pool2d(x, *args)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x = shape_placeholder(ctx.x_shape, grad_out, ctx.x_format)
        kernel, stride, padding, ceil_mode, count_include_pad, divisor = ctx.args
        grad_x = torch.ops.aten.avg_pool2d_backward(
            grad_out, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor
        )
        return grad_x, None


class _MaxPool2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, args: tuple[Any, ...]) -> Tensor:  # type: ignore[override]
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, *args)
        ctx.x_shape, ctx.x_format, ctx.args = x.shape, memory_format_of(x), args
        if ctx.needs_input_grad[0]:
            plane = x.shape[-1] * x.shape[-2]
            ctx.save_for_backward(indices.to(torch.int32) if plane < 2**31 else indices)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        x = shape_placeholder(ctx.x_shape, grad_out, ctx.x_format)
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad_out, x, *ctx.args, indices.long())
        return grad_x, None


class _AdaptiveAvgPool2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, output_size: tuple[int, int]) -> Tensor:  # type: ignore[override]
        ctx.x_shape, ctx.x_format = x.shape, memory_format_of(x)
        return torch.ops.aten._adaptive_avg_pool2d(x, output_size)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x = shape_placeholder(ctx.x_shape, grad_out, ctx.x_format)
        return torch.ops.aten._adaptive_avg_pool2d_backward(grad_out, x), None


def _one(value: Any) -> int:
    return int(value[0] if isinstance(value, tuple | list) else value)


class MemorySavingAvgPool2d(MemorySavingModule, nn.AvgPool2d):
    """``nn.AvgPool2d`` that keeps nothing for backward."""

    stock_type = nn.AvgPool2d

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        kernel = list(_pair(self.kernel_size))
        stride = list(_pair(self.stride if self.stride is not None else self.kernel_size))
        args = (kernel, stride, list(_pair(self.padding)), self.ceil_mode, self.count_include_pad,
                self.divisor_override)  # fmt: skip
        return _AvgPool2dFn.apply(x, args)


class MemorySavingAvgPool1d(MemorySavingModule, nn.AvgPool1d):
    """``nn.AvgPool1d`` that keeps nothing for backward."""

    stock_type = nn.AvgPool1d

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        stride = self.stride if self.stride is not None and self.stride != () else self.kernel_size
        args = ([1, _one(self.kernel_size)], [1, _one(stride)], [0, _one(self.padding)], self.ceil_mode,
                self.count_include_pad, None)  # fmt: skip
        return _AvgPool2dFn.apply(x.unsqueeze(-2), args).squeeze(-2)


class MemorySavingMaxPool2d(MemorySavingModule, nn.MaxPool2d):
    """``nn.MaxPool2d`` that keeps only int32 argmax indices for backward."""

    stock_type = nn.MaxPool2d

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or self.return_indices:
            return super().forward(x)
        stride = self.stride if self.stride is not None and self.stride != () else self.kernel_size
        args = (list(_pair(self.kernel_size)), list(_pair(stride)), list(_pair(self.padding)),
                list(_pair(self.dilation)), self.ceil_mode)  # fmt: skip
        return _MaxPool2dFn.apply(x, args)


class MemorySavingMaxPool1d(MemorySavingModule, nn.MaxPool1d):
    """``nn.MaxPool1d`` that keeps only int32 argmax indices for backward."""

    stock_type = nn.MaxPool1d

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or self.return_indices:
            return super().forward(x)
        stride = self.stride if self.stride is not None and self.stride != () else self.kernel_size
        args = ([1, _one(self.kernel_size)], [1, _one(stride)], [0, _one(self.padding)],
                [1, _one(self.dilation)], self.ceil_mode)  # fmt: skip
        return _MaxPool2dFn.apply(x.unsqueeze(-2), args).squeeze(-2)


def _adaptive_size(output_size: Any, in_size: tuple[int, ...]) -> tuple[int, ...]:
    sizes = output_size if isinstance(output_size, tuple | list) else (output_size,) * len(in_size)
    return tuple(int(s) if s is not None else d for s, d in zip(sizes, in_size, strict=True))


class MemorySavingAdaptiveAvgPool2d(MemorySavingModule, nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` that keeps nothing for backward."""

    stock_type = nn.AdaptiveAvgPool2d

    def forward(self, x: Tensor) -> Tensor:
        size = _adaptive_size(self.output_size, tuple(x.shape[-2:]))
        if not torch.is_grad_enabled() or size == (1, 1):
            return super().forward(x)
        return _AdaptiveAvgPool2dFn.apply(x, size)


class MemorySavingAdaptiveAvgPool1d(MemorySavingModule, nn.AdaptiveAvgPool1d):
    """``nn.AdaptiveAvgPool1d`` that keeps nothing for backward."""

    stock_type = nn.AdaptiveAvgPool1d

    def forward(self, x: Tensor) -> Tensor:
        (size,) = _adaptive_size(self.output_size, tuple(x.shape[-1:]))
        if not torch.is_grad_enabled() or size == 1:
            return super().forward(x)
        return _AdaptiveAvgPool2dFn.apply(x.unsqueeze(-2), (1, size)).squeeze(-2)


for _cls in (
    MemorySavingAdaptiveAvgPool1d,
    MemorySavingAdaptiveAvgPool2d,
    MemorySavingAvgPool1d,
    MemorySavingAvgPool2d,
    MemorySavingMaxPool1d,
    MemorySavingMaxPool2d,
):
    register_op(_cls.stock_type, _cls.from_module)
