"""``nn.Sequential`` that runs conv -> BatchNorm -> activation runs as one op and activations in place.

A stock ``nn.ReLU6()`` (``inplace=False``, as MobileNetV2 and MCUNet build it) writes its output to a new
tensor: one allocation and one pass over fresh memory per activation, which on a CPU costs about as much
as the 1-bit mask the memory-saving op computes on top. Inside an ``nn.Sequential`` the output of one
layer goes only to the next one, so

* a frozen convolution followed by its eval-mode BatchNorm with a frozen scale (and optionally a ReLU or
  ReLU6), the layers a bias-only or lite-residual scheme leaves frozen, runs as one autograd Function:
  the norm and the activation overwrite the convolution's output, and backward calls the kernels the
  three separate ops call, one Python autograd node instead of three;
* any other ReLU-family activation after a convolution, linear layer or norm (whose autograd nodes, stock
  or memory-saving, keep their input, never their output) runs in place on that layer's output.

Outputs and gradients are the same, bit for bit, and so is what is kept for backward; there are fewer
tensors. This happens only where no hook can see the tensors in between: a forward hook of the producer,
a pre-hook of the activation, backward hooks on either, or a global module hook turn it off, and the
layers then run exactly as in ``nn.Sequential``. ``memory.measure`` and ``memory.estimate`` attribute
memory with forward hooks on every module, so they see the separate layers: their peak is an upper bound
of the fused one, and what is kept for backward is the same either way.

:func:`ondevice.ops.convert` replaces every ``nn.Sequential`` child (or subclass keeping Sequential's
``forward``; not the root it is given) that has such layers; :func:`ondevice.ops.restore` turns it back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, TypeGuard

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from ondevice.ops._bitmask import masked_grad
from ondevice.ops.activation import (
    MemorySavingLeakyReLU,
    MemorySavingReLU,
    MemorySavingReLU6,
    _activate,
    _keep_mask,
)
from ondevice.ops.conv import (
    _CONV,
    _CONVOLUTION_BACKWARD,
    MemorySavingConv1d,
    MemorySavingConv2d,
    MemorySavingConv3d,
    resolve_padding,
)
from ondevice.ops.linear import MemorySavingLinear
from ondevice.ops.norm import (
    MemorySavingBatchNorm1d,
    MemorySavingBatchNorm2d,
    MemorySavingBatchNorm3d,
    MemorySavingGroupNorm,
    MemorySavingLayerNorm,
    empty_batch_norm_stats,
)
from ondevice.ops.placeholder import shape_placeholder
from ondevice.ops.registry import MaskMode, clone_module_as

__all__ = ["MemorySavingSequential", "fusable_runs", "inplace_pairs", "sequential_applies"]

# Layers whose autograd nodes (stock or memory-saving) never keep their output, which is a new tensor.
_PRODUCERS: tuple[type[nn.Module], ...] = (
    MemorySavingBatchNorm1d,
    MemorySavingBatchNorm2d,
    MemorySavingBatchNorm3d,
    MemorySavingConv1d,
    MemorySavingConv2d,
    MemorySavingConv3d,
    MemorySavingGroupNorm,
    MemorySavingLayerNorm,
    MemorySavingLinear,
)
_FUSED_NORM: dict[type[nn.Module], type[nn.Module]] = {
    MemorySavingConv1d: MemorySavingBatchNorm1d,
    MemorySavingConv2d: MemorySavingBatchNorm2d,
    MemorySavingConv3d: MemorySavingBatchNorm3d,
}
_FUSED_ACTIVATIONS: tuple[type[nn.Module], ...] = (MemorySavingReLU, MemorySavingReLU6)
_BATCH_NORM_OUT = torch.ops.aten.native_batch_norm.out
_BATCH_NORM_BACKWARD = torch.ops.aten.native_batch_norm_backward.default
_ACTIVATIONS: tuple[type[nn.Module], ...] = (MemorySavingReLU, MemorySavingReLU6, MemorySavingLeakyReLU)


def _in_place_pair(producer: nn.Module, activation: nn.Module) -> bool:
    """Whether ``activation`` may overwrite the output of ``producer`` (by op class; hooks aside).

    Twins of subclasses (:func:`~ondevice.ops.registry.twin_class`) run their op class's ``forward``.
    """
    return isinstance(producer, _PRODUCERS) and isinstance(activation, _ACTIVATIONS)


def inplace_pairs(sequential: Iterable[nn.Module]) -> tuple[int, ...]:
    """Indices of the activations of ``sequential`` that may run in place on their predecessor's output."""
    layers = list(sequential)
    return tuple(i for i in range(1, len(layers)) if _in_place_pair(layers[i - 1], layers[i]))


def fusable_runs(sequential: Iterable[nn.Module]) -> tuple[int, ...]:
    """Indices of the convolutions of ``sequential`` followed by a BatchNorm they may run fused with."""
    layers = list(sequential)
    return tuple(i for i in range(len(layers) - 1) if _fused_pair(layers[i], layers[i + 1]))


def _fused_pair(conv: nn.Module, norm: nn.Module) -> bool:
    return any(isinstance(conv, c) and isinstance(norm, n) for c, n in _FUSED_NORM.items())


def _hooked(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _global_hooks() -> bool:
    return bool(
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


class _ConvBatchNormFn(torch.autograd.Function):
    """A frozen conv, a frozen eval-mode BatchNorm and optionally a ReLU/ReLU6 as one op.

    The norm and the activation overwrite the convolution's output, and the three backward kernels are
    the ones the separate ops call (``masked_grad``, ``native_batch_norm_backward`` with the output
    gradient standing in for the input it does not read, ``convolution_backward`` with a shape
    placeholder), so outputs and gradients are bit-identical to stock's; what is kept is the mask alone.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        conv_weight: Tensor,
        conv_bias: Tensor | None,
        norm_weight: Tensor | None,
        norm_bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        conv_args: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int],
        eps: float,
        act: tuple[str, MaskMode] | None,
    ) -> Tensor:
        y = _CONV[x.dim() - 2](x, conv_weight, conv_bias, *conv_args)
        # Two distinct statistics buffers: in eval mode CUDA's kernel copies the running mean into
        # ``save_mean`` and writes the inverse std into ``save_invstd`` before normalising with both, so
        # one shared buffer would normalise with the inverse std as the mean. CPU leaves them empty.
        save_mean, save_invstd = empty_batch_norm_stats(running_mean), empty_batch_norm_stats(running_mean)
        _BATCH_NORM_OUT(y, norm_weight, norm_bias, running_mean, running_var, False, 0.0, eps,
                        out=y, save_mean=save_mean, save_invstd=save_invstd)  # fmt: skip
        mask = None
        if act is not None:
            kind, mode = act
            _activate(kind, y, 0.0, True)
            mask = _keep_mask(kind, y, mode)
        ctx.conv_args, ctx.eps, ctx.act, ctx.shape, ctx.x_shape = conv_args, eps, act, y.shape, x.shape
        ctx.bias_shape = None if conv_bias is None else conv_bias.shape
        ctx.save_for_backward(mask, conv_weight, norm_weight, running_mean, running_var)
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        mask, conv_weight, norm_weight, running_mean, running_var = ctx.saved_tensors
        if ctx.act is not None:
            grad_out = masked_grad(grad_out, mask, ctx.shape, ctx.act[1])
        needs_x, needs_conv_bias, needs_norm_bias = (ctx.needs_input_grad[i] for i in (0, 2, 4))
        no_stats = empty_batch_norm_stats(running_mean)
        grad_norm_in, _, grad_norm_bias = _BATCH_NORM_BACKWARD(
            grad_out, grad_out, norm_weight, running_mean, running_var, no_stats, no_stats, False, ctx.eps,
            [needs_x or needs_conv_bias, False, needs_norm_bias],
        )  # fmt: skip
        grad_x = grad_conv_bias = None
        if needs_x or needs_conv_bias:
            stride, padding, dilation, groups = ctx.conv_args
            grad_x, _, grad_conv_bias = _CONVOLUTION_BACKWARD(
                grad_norm_in, shape_placeholder(ctx.x_shape, grad_out), conv_weight, ctx.bias_shape,
                stride, padding, dilation, False, [0] * len(stride), groups,
                [needs_x, False, needs_conv_bias],
            )  # fmt: skip
        return (grad_x if needs_x else None, None, grad_conv_bias if needs_conv_bias else None, None,
                grad_norm_bias if needs_norm_bias else None, None, None, None, None, None)  # fmt: skip


def _fusable(layers: Sequence[nn.Module], i: int, x: Tensor) -> int:
    """How many layers from ``layers[i]`` run as one :class:`_ConvBatchNormFn` (0, 2 or 3) on input ``x``.

    A conv whose weight is frozen, then its BatchNorm in eval mode with running statistics and a frozen
    scale, then optionally a ReLU or ReLU6; something must need a gradient, the input must be contiguous
    (so the norm overwrites a contiguous output) and no hook may see inside.
    """
    conv = layers[i]  # a fuse candidate of the plan: a conv followed by its BatchNorm type
    norm: Any = layers[i + 1]
    weight: Any = conv.weight
    if weight.requires_grad or norm.training or norm.running_mean is None or norm.running_var is None:
        return 0
    if norm.weight is not None and norm.weight.requires_grad:
        return 0
    trains = [t.requires_grad for t in (x, conv.bias, norm.bias) if t is not None]
    if not any(trains) or not x.is_contiguous() or _hooked(conv) or _hooked(norm):
        return 0
    act = layers[i + 2] if i + 2 < len(layers) else None
    return 3 if isinstance(act, _FUSED_ACTIVATIONS) and not _hooked(act) else 2


_FUSE_CANDIDATE, _IN_PLACE_CANDIDATE = 1, 2


def _static_plan(layers: tuple[nn.Module, ...]) -> tuple[int, ...]:
    """Per layer, what its type allows: the start of a fused run, an in-place activation, or neither.

    Cached by :class:`MemorySavingSequential` while its children stay the same objects; what can change
    between calls (gradients required, training mode, hooks) is checked at every call.
    """
    kinds = [0] * len(layers)
    for i in inplace_pairs(layers):
        kinds[i] = _IN_PLACE_CANDIDATE
    for i in fusable_runs(layers):
        kinds[i] = _FUSE_CANDIDATE
    return tuple(kinds)


def _run_fused(layers: Sequence[nn.Module], x: Tensor) -> Tensor:
    conv: Any = layers[0]
    norm: Any = layers[1]
    norm._check_input_dim(x)
    x, padding = resolve_padding(conv, x)
    act = (layers[2].kind, layers[2].op_options.mask) if len(layers) == 3 else None  # type: ignore[union-attr]
    return _ConvBatchNormFn.apply(
        x, conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var,
        (conv.stride, padding, conv.dilation, conv.groups), norm.eps, act,
    )  # fmt: skip


def sequential_applies(module: nn.Module) -> TypeGuard[nn.Sequential]:
    """Whether ``module`` is an ``nn.Sequential`` (or a subclass keeping its ``forward``) not yet converted.

    torchvision's ``Conv2dNormActivation`` and ``MLPBlock`` are such subclasses; one that defines
    ``forward`` or ``__iter__`` of its own may run its layers differently and is left alone.
    """
    if not isinstance(module, nn.Sequential) or isinstance(module, MemorySavingSequential):
        return False
    for cls in type(module).__mro__:
        if cls is nn.Sequential:
            return True
        if "forward" in cls.__dict__ or "__iter__" in cls.__dict__:
            return False
    return False


class MemorySavingSequential(nn.Sequential):
    """``nn.Sequential`` fusing frozen conv-BatchNorm(-ReLU) runs and running activations in place.

    See the module docstring for when. Same children, names and ``state_dict`` as the ``nn.Sequential``
    it replaces; for a subclass of ``nn.Sequential``, :func:`~ondevice.ops.registry.twin_class` mixes this
    class into it, so the result is still an instance of the subclass.
    """

    stock_type: ClassVar[type[nn.Sequential]] = nn.Sequential

    def forward(self, input: Tensor) -> Tensor:  # nn.Sequential's parameter name
        if _global_hooks():
            return super().forward(input)
        layers = tuple(self._modules.values())
        plan = self.__dict__.get("_plan")
        if plan is None or plan[0] != layers:  # first call, or a child was replaced (compared by identity)
            plan = self.__dict__["_plan"] = (layers, _static_plan(layers))
        kinds = plan[1]
        grad = torch.is_grad_enabled()
        i, count = 0, len(layers)
        while i < count:
            layer, kind = layers[i], kinds[i]
            if kind == _FUSE_CANDIDATE and grad:
                fused = _fusable(layers, i, input)
                if fused:
                    input = _run_fused(layers[i : i + fused], input)
                    i += fused
                    continue
            elif kind == _IN_PLACE_CANDIDATE and not (_hooked(layers[i - 1]) or _hooked(layer)):
                input = layer.forward_inplace(input)  # type: ignore[operator]
                i += 1
                continue
            input = layer(input)
            i += 1
        return input

    def to_stock(self) -> nn.Sequential:
        """The ``nn.Sequential`` (or subclass) this one replaced, with the same children."""
        stock = clone_module_as(self, self.stock_type)
        stock.__dict__.pop("_plan", None)
        return stock
