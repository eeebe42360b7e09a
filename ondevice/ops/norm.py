"""Memory-saving BatchNorm (eval-mode statistics), GroupNorm and LayerNorm.

BatchNorm with running statistics is an affine map per channel, ``y = (x - mu) / sqrt(var + eps) * g + b``,
so ``dx = dy * g / sqrt(var + eps)`` needs no activation; ``dg = sum(dy * x_hat)`` needs the input; ``db =
sum(dy)`` needs nothing (TinyTL, Cai et al. 2020, Sec. 2). This op keeps the input only when the scale
trains. A BatchNorm in training mode (batch statistics) falls back to stock autograd.

GroupNorm and LayerNorm normalise with statistics of the sample itself, so ``dx`` needs the normalised
input whenever the input or the scale needs a gradient: the op then keeps the input plus the per-group
mean and reciprocal standard deviation, as stock autograd does. It keeps nothing when only the bias
trains (or nothing does), e.g. in a lite-residual branch fed by a frozen block.

Backward calls the ATen kernels stock autograd calls (``native_batch_norm_backward``,
``native_group_norm_backward``, ``native_layer_norm_backward``). When the input is not kept, ``dy``
itself is passed in its place: the kernels read it only for the gradients that were not asked for, so the
requested ones are bit-identical to stock PyTorch's.

Where the op would keep what stock keeps (the scale trains, or for GroupNorm/LayerNorm the input needs a
gradient) or nothing needs a gradient, the layer runs stock and skips the Python autograd Function.

The library layers built on these norms get the same ops: timm's ``BatchNormAct2d`` (BatchNorm2d followed
by its own ``drop`` and ``act`` children), timm's ``LayerNorm``/``LayerNorm2d`` and transformers'
``ConvNextLayerNorm`` (channels-first LayerNorm as permute, LayerNorm, permute).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn import functional as F

from ondevice._example import ExampleSpec
from ondevice._kept import outputs_kept_by_others, storage_key
from ondevice.ops.registry import MemorySavingModule, register_op

logger = logging.getLogger(__name__)

__all__ = [
    "MemorySavingBatchNorm1d",
    "MemorySavingBatchNorm2d",
    "MemorySavingBatchNorm3d",
    "MemorySavingGroupNorm",
    "MemorySavingLayerNorm",
    "layer_norm",
    "mark_shared_norms",
    "output_recovers_input",
    "share_norm_output",
]


def _stock_keeps_the_same(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, *, input_needed: bool
) -> bool:
    """Whether stock autograd keeps no more than the op: nothing needs a grad, or what needs one needs x.

    ``input_needed``: the input's own gradient needs the input (GroupNorm/LayerNorm), not only the scale's.
    """
    scale_trains = weight is not None and weight.requires_grad
    if scale_trains or (input_needed and x.requires_grad):
        return True
    return not (x.requires_grad or (bias is not None and bias.requires_grad))


def empty_batch_norm_stats(running_stat: Tensor) -> Tensor:
    """The empty ``save_mean``/``save_invstd`` an eval-mode ``native_batch_norm`` hands its backward.

    Stock autograd passes the forward's statistics outputs to ``native_batch_norm_backward``; in eval mode
    they are empty on CPU and the kernel reads the running statistics instead. CUDA's backward asserts
    they are *defined* (``save_mean->defined()``), so passing ``None`` works on CPU and crashes on CUDA.
    They take the dtype and device of the running statistics, which the CPU kernels require to match.
    """
    return running_stat.new_empty(0)


class _BatchNormEvalFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
    ) -> Tensor:
        ctx.eps = eps
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, running_mean, running_var)
        return torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps, False)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, running_mean, running_var = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        no_stats = empty_batch_norm_stats(running_mean)
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward.default(
            grad_out, grad_out if x is None else x, weight, running_mean, running_var,
            no_stats, no_stats, False, ctx.eps, mask,
        )  # fmt: skip
        return (grad_x if mask[0] else None, grad_w if mask[1] else None, grad_b if mask[2] else None,
                None, None, None)  # fmt: skip


class _BatchNormMixin(MemorySavingModule):
    def forward(self, x: Tensor) -> Tensor:
        bn: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        if bn.training or bn.running_mean is None or bn.running_var is None or not torch.is_grad_enabled():
            return super().forward(x)  # type: ignore[safe-super]
        weight, bias = bn.weight, bn.bias
        if _stock_keeps_the_same(x, weight, bias, input_needed=False):
            return super().forward(x)  # type: ignore[safe-super]
        bn._check_input_dim(x)
        return _BatchNormEvalFn.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)


class MemorySavingBatchNorm1d(_BatchNormMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d``; in eval mode keeps its input only when its scale trains."""

    stock_type = nn.BatchNorm1d


class MemorySavingBatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d``; in eval mode keeps its input only when its scale trains."""

    stock_type = nn.BatchNorm2d


class MemorySavingBatchNorm3d(_BatchNormMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d``; in eval mode keeps its input only when its scale trains."""

    stock_type = nn.BatchNorm3d


class _GroupNormFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float
    ) -> Tensor:
        n, c = x.shape[0], x.shape[1]
        hw = x.numel() // max(n * c, 1)
        out, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, hw, num_groups, eps)
        ctx.sizes = (n, c, hw, num_groups)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(x, mean, rstd, weight)
        else:
            ctx.stats_shape = mean.shape
            ctx.save_for_backward(None, None, None, weight)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, mean, rstd, weight = ctx.saved_tensors
        if x is None:
            x = grad_out
            mean = rstd = grad_out.new_zeros(ctx.stats_shape)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grad_x, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
            grad_out.contiguous(), x, mean, rstd, weight, *ctx.sizes, mask
        )
        return (grad_x if mask[0] else None, grad_w if mask[1] else None, grad_b if mask[2] else None,
                None, None)  # fmt: skip


class MemorySavingGroupNorm(MemorySavingModule, nn.GroupNorm):
    """``nn.GroupNorm`` that keeps nothing for backward when neither its input nor its scale needs a grad."""

    stock_type = nn.GroupNorm

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or _stock_keeps_the_same(x, self.weight, self.bias, input_needed=True):
            return super().forward(x)
        return _GroupNormFn.apply(x, self.weight, self.bias, self.num_groups, self.eps)


_SHARE: ContextVar[frozenset[int] | None] = ContextVar("ondevice_share_norm_output", default=None)
_MAX_SHIFT = 1e2
"""The largest ``|bias / weight|`` for which the normalised input comes back from the output: the error
of ``(y - bias) / weight`` is about ``eps * |bias / weight|``, at most ~1e-5 here (float32)."""


@contextmanager
def share_norm_output(kept: Iterable[Tensor] = ()) -> Iterator[None]:
    """Within it, a LayerNorm whose input needs a gradient keeps its *output* (and ``1/std``) rather than its
    input where that is exact (:func:`output_recovers_input`): the normalised input is ``(y - bias) /
    weight``. It pays where the output is kept anyway: by the next layer (a trained projection), or as the
    output of a recomputed block (``ondevice.recompute``), which then stops its recomputation earlier. A
    norm whose input is one of ``kept`` (kept anyway: a recomputed block's inputs) keeps its input."""
    token = _SHARE.set(frozenset(k for k in (storage_key(t) for t in kept) if k is not None))
    try:
        yield
    finally:
        _SHARE.reset(token)


_SMALLEST_SCALE: dict[int, tuple[weakref.ref[Tensor], int, float]] = {}
"""Per scale tensor (by id, with a weak reference that tells a reused id apart): its version and its smallest
magnitude, so a frozen scale is read once."""


def _smallest_magnitude(weight: Tensor) -> float:
    known = _SMALLEST_SCALE.get(id(weight))
    if known is not None and known[0]() is weight and known[1] == weight._version:
        return known[2]
    with torch.no_grad():
        smallest = float(weight.abs().min())
    if known is None or known[0]() is not weight:  # a new tensor: forget it when it goes
        weakref.finalize(weight, _SMALLEST_SCALE.pop, id(weight), None)
    _SMALLEST_SCALE[id(weight)] = (weakref.ref(weight), weight._version, smallest)
    return smallest


def output_recovers_input(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether a LayerNorm's normalised input comes back from its output to float precision: on the CPU
    (the check reads the scale, which on an accelerator would wait for it), a scale without zeros and
    ``max |bias| <= 100 * min |weight|`` (so ``|bias / weight| <= 100`` everywhere)."""
    if x.device.type != "cpu":
        return False
    if weight is None:
        return True
    if isinstance(weight, FakeTensor) or isinstance(x, FakeTensor):
        return True  # an estimate: a fake scale has no values (a real step decides the same on real ones)
    smallest = _smallest_magnitude(weight)
    if smallest <= 0.0:
        return False
    if bias is None:
        return True
    with torch.no_grad():
        return float(torch.linalg.vector_norm(bias, float("inf"))) <= _MAX_SHIFT * smallest


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, shape: list[int], eps: float,
        share: bool = False,
    ) -> Tensor:  # fmt: skip
        out, mean, rstd = torch.ops.aten.native_layer_norm(x, shape, weight, bias, eps)
        ctx.shape, ctx.shared = shape, False
        if ctx.needs_input_grad[0] and share:
            ctx.shared = True
            ctx.save_for_backward(out, rstd, weight, bias)
        elif ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(x, mean, rstd, weight, bias)
        else:
            ctx.stats_shape = mean.shape
            ctx.save_for_backward(None, None, None, weight, bias)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        if ctx.shared:
            out, rstd, weight, bias = ctx.saved_tensors
            x_hat = out if bias is None else out - bias
            if weight is not None:
                x_hat = x_hat / weight
            # the kernel on x_hat with mean 0 and 1/std 1 gives the scale's and bias's gradients as they are,
            # and the input's divided by the true 1/std
            grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
                grad_out, x_hat, ctx.shape, torch.zeros_like(rstd), torch.ones_like(rstd), weight, bias, mask
            )
            if grad_x is not None:
                grad_x = grad_x.mul_(rstd)
        else:
            x, mean, rstd, weight, bias = ctx.saved_tensors
            if x is None:
                x = grad_out
                mean = rstd = grad_out.new_zeros(ctx.stats_shape)
            grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
                grad_out, x, ctx.shape, mean, rstd, weight, bias, mask
            )
        return (grad_x if mask[0] else None, grad_w if mask[1] else None, grad_b if mask[2] else None,
                None, None, None)  # fmt: skip


def layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """``nn.LayerNorm.forward`` (``F.layer_norm`` with ``norm``'s tensors) through the memory-saving op.

    Runs stock ``F.layer_norm`` where the op would keep what stock keeps, or nothing needs a gradient; under
    :func:`share_norm_output`, or for a norm marked ``share_output`` (:func:`mark_shared_norms`: its output
    is kept by the next layer anyway), keeps the output where that is exact.
    """
    if not torch.is_grad_enabled():
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    shared = _SHARE.get()
    wanted = getattr(norm, "share_output", False) or (shared is not None and storage_key(x) not in shared)
    if wanted and x.requires_grad and output_recovers_input(x, norm.weight, norm.bias):
        shape = list(norm.normalized_shape)
        return _LayerNormFn.apply(x, norm.weight, norm.bias, shape, norm.eps, True)  # type: ignore[no-any-return]
    if _stock_keeps_the_same(x, norm.weight, norm.bias, input_needed=True):
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return _LayerNormFn.apply(x, norm.weight, norm.bias, list(norm.normalized_shape), norm.eps)  # type: ignore[no-any-return]


def mark_shared_norms(model: nn.Module, example: ExampleSpec | None) -> list[str]:
    """Mark the LayerNorms of a converted ``model`` whose output another layer keeps for backward (a trained
    projection after it: LoRA's, full fine-tuning's), found on a fake forward on a batch shaped like
    ``example``: each then keeps that output (shared) and ``1/std`` instead of its own input, one tensor of
    the norm's size less (memory-sharing LayerNorm, Chen et al. 2024, arXiv 2406.16282). Returns their names;
    none without an example or where the model cannot run on fake tensors."""
    names = [name for name, m in model.named_modules() if isinstance(m, LAYER_NORM_OPS)]
    if not names or example is None:
        return []
    for name in names:
        model.get_submodule(name).__dict__.pop("share_output", None)
    try:
        shared = outputs_kept_by_others(model, names, example)
    except Exception as error:  # the model's own forward may not take a fake batch; nothing is marked
        logger.info("could not trace %s to find LayerNorms whose output is kept: %s", type(model).__name__,
                    error)  # fmt: skip
        return []
    for name in shared:
        model.get_submodule(name).share_output = True  # type: ignore[assignment]
    return shared


class MemorySavingLayerNorm(MemorySavingModule, nn.LayerNorm):
    """``nn.LayerNorm`` that keeps nothing for backward when neither its input nor its scale needs a grad."""

    stock_type = nn.LayerNorm

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(self, x)


# ------------------------------------------------------------------ library layers built on these norms


class _BatchNormAct2dOp(MemorySavingModule):
    """timm ``BatchNormAct2d`` (BatchNorm2d, then its ``drop`` and ``act`` children) with the eval op.

    In eval mode with running statistics and a frozen scale the norm keeps nothing (as
    :class:`MemorySavingBatchNorm2d`); ``drop`` and ``act`` are children, converted by ``convert`` (a ReLU
    then keeps a 1-bit mask, a SiLU its input). Everything else runs timm's own ``forward``, whose eval
    branch is ``F.batch_norm`` with the running statistics, i.e. the very kernel the op calls.
    """

    library_layer = "timm.layers.norm_act.BatchNormAct2d"

    def forward(self, x: Tensor) -> Tensor:
        bn: Any = self
        if (
            bn.training
            or bn.running_mean is None
            or bn.running_var is None
            or x.ndim != 4
            or not torch.is_grad_enabled()
            or _stock_keeps_the_same(x, bn.weight, bn.bias, input_needed=False)
        ):
            return super().forward(x)  # type: ignore[safe-super]
        x = _BatchNormEvalFn.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
        return bn.act(bn.drop(x))


class _TimmLayerNormOp(MemorySavingModule):
    """timm ``LayerNorm``: ``F.layer_norm`` through the op, or timm's own forward for its fast-norm path."""

    library_layer = "timm.layers.norm.LayerNorm"

    def forward(self, x: Tensor) -> Tensor:
        norm: Any = self
        if norm._fast_norm:
            return super().forward(x)  # type: ignore[safe-super]
        return layer_norm(norm, x)


class _TimmLayerNorm2dOp(MemorySavingModule):
    """timm ``LayerNorm2d``: channels-first LayerNorm as ``permute``, ``F.layer_norm``, ``permute``."""

    library_layer = "timm.layers.norm.LayerNorm2d"

    def forward(self, x: Tensor) -> Tensor:
        norm: Any = self
        if norm._fast_norm:
            return super().forward(x)  # type: ignore[safe-super]
        return layer_norm(norm, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ConvNextLayerNormOp(MemorySavingModule):
    """transformers ``ConvNextLayerNorm``: ``nn.LayerNorm`` over channels-last or permuted channels-first."""

    library_layer = "transformers.models.convnext.modeling_convnext.ConvNextLayerNorm"

    def forward(self, features: Tensor) -> Tensor:
        norm: Any = self
        if norm.data_format == "channels_first":
            return layer_norm(norm, features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return layer_norm(norm, features)


LAYER_NORM_OPS = (MemorySavingLayerNorm, _TimmLayerNormOp, _TimmLayerNorm2dOp, _ConvNextLayerNormOp)
"""The ops whose forward runs :func:`layer_norm` (and can keep their output instead of their input)."""

for _cls in (
    MemorySavingBatchNorm1d,
    MemorySavingBatchNorm2d,
    MemorySavingBatchNorm3d,
    MemorySavingGroupNorm,
    MemorySavingLayerNorm,
):
    register_op(_cls.stock_type, _cls.from_module)

# Fingerprints of the library source each op mirrors (see registry.source_fingerprint); a test checks them.
for _op, _fingerprint, _written_for in (
    (_BatchNormAct2dOp, "c53eb5516b3c252a", "timm 1.0.31"),
    (_TimmLayerNormOp, "fa4b228852552a23", "timm 1.0.31"),
    (_TimmLayerNorm2dOp, "365777cf1e3bd40d", "timm 1.0.31"),
    (_ConvNextLayerNormOp, "ebfd27228e203ca4", "transformers 5.25.0"),
):
    register_op(_op.library_layer, _op.from_module, fingerprint=_fingerprint, written_for=_written_for)
