"""Memory-saving activations: masks for the ReLU family, (optionally compressed) inputs for smooth ones.

ReLU, ReLU6 and LeakyReLU have piecewise-constant derivatives, so backward needs only *where* the input
fell: ``x > 0`` for ReLU and LeakyReLU, ``0 < x < 6`` for ReLU6 (strict at both ends, exactly as stock
``hardtanh_backward`` zeroes the gradient at ``x == 0`` and ``x == 6``). The mask is packed 1 bit per
element by default (TinyTL, Cai et al. 2020, Sec. 3: "ReLU only needs a binary mask"), or kept 1 byte per
element with ``mask="byte"``; stock PyTorch keeps a full-precision tensor (32 bits per element).

SiLU, GELU, Hardswish, Sigmoid and Tanh need the input (SiLU, GELU, Hardswish) or output (Sigmoid, Tanh)
itself, which they keep at full precision (as TinyTL counts them), or 8-bit compressed with
``compress="int8"`` (lossy; see ``_compress``); backward then calls the ATen kernels stock autograd calls.
With ``compress="2bit"`` they keep 2 bits per element, the interval of a 4-level step derivative the
input fell in, and backward multiplies the gradient by that level (ReGELU2/ReSiLU2; the forward is
unchanged; thresholds, levels and their derivation in ``_compress``). An activation without a 2-bit
derivative (Mish, QuickGELU and the other library expressions below but GELU and SiLU) keeps 8 bits.

For the ReLU family backward computes stock's ``threshold_backward`` (ReLU, ReLU6; see
``_bitmask.masked_grad``) or runs stock's ``leaky_relu_backward`` on the 0/1 mask in place of the input, so
gradients are bit-identical to stock PyTorch's. On plain CPU tensors the mask is built by numpy comparisons
straight into a bool buffer (ATen's comparisons into ``bool`` are several times slower), so a ReLU6 costs
three cheap passes on top of stock's forward and its backward one pass, like stock's. Inside an
``nn.Sequential`` the activation after a convolution, linear layer or norm runs in place on that layer's
output (:meth:`_MaskedMixin.forward_inplace`, called by ``sequential.MemorySavingSequential``), which
saves the allocation and the write of a new output, about what the mask costs.

The activation layers of transformers (``ACT2FN``: ``GELUActivation``, ``NewGELUActivation``, ...) and
timm (``GELU``, ``GELUTanh``) get ops too: those whose forward is one fused ATen op (``F.gelu``,
``F.silu``, ``F.mish``) use the smooth op above; those written as an expression of several ops (GPT-2's
``NewGELUActivation``, ``QuickGELUActivation``, ...) keep only their input, where stock keeps every
intermediate, and backward differentiates the layer's own forward again (:class:`_DerivedFn`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ondevice.ops._bitmask import decode_mask, encode_mask, masked_grad, numpy_fast_path, shape_only
from ondevice.ops._compress import (
    STEP_DERIVATIVES,
    Compressed,
    StepDerivative,
    compress_int8,
    decompress_int8,
    encode_2bit,
    step_grad,
)
from ondevice.ops.registry import CompressMode, MaskMode, MemorySavingModule, register_op

__all__ = [
    "MemorySavingGELU",
    "MemorySavingHardswish",
    "MemorySavingLeakyReLU",
    "MemorySavingReLU",
    "MemorySavingReLU6",
    "MemorySavingSiLU",
    "MemorySavingSigmoid",
    "MemorySavingTanh",
]


_LEAKY_RELU_BACKWARD = torch.ops.aten.leaky_relu_backward.default
_HARDTANH_BACKWARD = torch.ops.aten.hardtanh_backward.default
_CHUNK = 1 << 18  # elements per numpy pass over a large mask: 1 MiB of float32, cache-sized


def _mask(kind: str, y: Tensor) -> Tensor:
    """The derivative mask of ``kind`` as a bool tensor, computed from the activation's output ``y``.

    A float-to-bool conversion (non-zero -> True) is a fast vectorised kernel, where ATen's comparisons
    into bool are not. ReLU's mask is ``y != 0`` (NaN passes, as in stock ``threshold_backward``).
    ReLU6's is the non-zeros of stock ``hardtanh_backward(y, y, 0, 6)``: ``y`` where ``0 < y < 6``, else 0,
    i.e. exactly ``0 < x < 6`` (``y == x`` there, and ``y`` is 0 or 6 outside). LeakyReLU's (slope >= 0)
    is ``relu(y) != 0``, i.e. ``x > 0``. Used where numpy cannot run (see :func:`_keep_mask`).
    """
    if kind == "relu":
        return y.bool()
    if kind == "relu6":
        return _HARDTANH_BACKWARD(y, y, 0.0, 6.0).bool()
    return torch.relu(y).bool()


def _keep_mask(kind: str, y: Tensor, mode: MaskMode) -> Tensor:
    """What the op keeps for backward: the derivative mask of ``kind`` from the output ``y``, encoded.

    On plain CPU tensors numpy builds it with the same tests as :func:`_mask` (``y != 0`` for ReLU;
    ``y != 0 and not y >= 6`` for ReLU6, NaN passing as in stock; ``y > 0`` for LeakyReLU) and packs it,
    a few microseconds of fixed cost instead of the tens that allocating through torch takes, in chunks of
    :data:`_CHUNK` elements for large tensors. The result passes through one ATen op (``detach``, the
    cheapest), so ``memory``'s live-tensor tracker sees its storage.
    """
    if not numpy_fast_path(y):  # fake and meta tensors are never on it
        if not shape_only(y):
            return encode_mask(_mask(kind, y), mode)
        if mode == "bit":
            return torch.empty((y.numel() + 7) // 8, dtype=torch.uint8, device=y.device)
        return torch.empty(y.shape, dtype=torch.bool, device=y.device)
    values = y.detach().numpy()
    if y.numel() <= _CHUNK or not values.flags.c_contiguous:
        keep = _numpy_mask(kind, values, None)
        if mode == "bit":
            return torch.from_numpy(np.packbits(keep, axis=None, bitorder="little")).detach()
        return torch.from_numpy(np.ascontiguousarray(keep)).detach()
    # Large tensors in chunks, so the comparisons after the first read ``y`` from cache, not memory.
    flat, numel = values.reshape(-1), y.numel()
    bit = mode == "bit"
    out: np.ndarray = np.empty((numel + 7) // 8 if bit else numel, dtype=np.uint8 if bit else np.bool_)
    scratch = np.empty((2, _CHUNK), dtype=np.bool_)
    for start in range(0, numel, _CHUNK):
        chunk = flat[start : start + _CHUNK]
        size = chunk.size
        if mode == "bit":
            keep = _numpy_mask(kind, chunk, scratch[0, :size], scratch[1, :size])
            out[start // 8 : (start + size + 7) // 8] = np.packbits(keep, bitorder="little")
        else:
            _numpy_mask(kind, chunk, out[start : start + size], scratch[1, :size])
    return torch.from_numpy(out if bit else out.reshape(y.shape)).detach()


def _numpy_mask(
    kind: str, values: np.ndarray, out: np.ndarray | None, scratch: np.ndarray | None = None
) -> np.ndarray:
    """:func:`_mask`'s tests in numpy on ``values`` (into ``out`` if given; ``scratch``: a bool buffer)."""
    if kind == "relu":
        return np.not_equal(values, 0, out=out)
    if kind == "relu6":
        keep = np.not_equal(values, 0, out=out)
        return np.greater(keep, np.greater_equal(values, 6, out=scratch), out=keep)  # and not saturated
    return np.greater(values, 0, out=out)


def _activate(kind: str, x: Tensor, slope: float, inplace: bool) -> Tensor:
    """Stock ReLU, ReLU6 or LeakyReLU of ``x`` (what the stock layer's ``forward`` computes)."""
    if kind == "relu":
        return F.relu(x, inplace)
    if kind == "relu6":
        return F.hardtanh(x, 0.0, 6.0, inplace)
    return F.leaky_relu(x, slope, inplace)


class _MaskedFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, kind: str, slope: float, inplace: bool, mode: MaskMode
    ) -> Tensor:
        y = _activate(kind, x, slope, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.kind, ctx.slope, ctx.mode, ctx.shape = kind, slope, mode, y.shape
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(_keep_mask(kind, y, mode))
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (stored,) = ctx.saved_tensors
        if ctx.kind != "leaky_relu":
            return masked_grad(grad_out, stored, ctx.shape, ctx.mode), None, None, None, None
        # Stock's kernel only tests ``x > 0``, so a 0/1 stand-in for x gives stock's exact arithmetic.
        mask = decode_mask(stored, ctx.shape, ctx.mode, grad_out.dtype)
        return _LEAKY_RELU_BACKWARD(grad_out, mask, ctx.slope, False), None, None, None, None


@dataclass(frozen=True)
class _Smooth:
    forward: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor], Tensor]
    keeps_output: bool
    step: StepDerivative | None = None  # the 2-bit derivative (``compress="2bit"``)


def _keep_2bit(ctx: Any, x: Tensor, compress: CompressMode | None, step: StepDerivative | None) -> bool:
    """Keep ``x``'s 2-bit codes on ``ctx`` when ``compress`` is ``"2bit"`` and ``step`` is known."""
    ctx.step = step if compress == "2bit" else None
    if ctx.step is None:
        return False
    ctx.shape = x.shape
    ctx.save_for_backward(encode_2bit(x, ctx.step))
    return True


class _SmoothFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, spec: _Smooth, compress: CompressMode | None
    ) -> Tensor:
        y = spec.forward(x)
        ctx.spec, ctx.compress = spec, compress is not None
        if ctx.needs_input_grad[0] and not _keep_2bit(ctx, x, compress, spec.step):
            kept = y if spec.keeps_output else x
            if compress:
                ctx.shape, ctx.dtype = kept.shape, kept.dtype
                ctx.save_for_backward(*compress_int8(kept))
            else:
                ctx.save_for_backward(kept)
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.step is not None:
            return step_grad(grad_out, ctx.saved_tensors[0], ctx.step, ctx.shape), None, None
        if ctx.compress:
            kept = decompress_int8(Compressed(*ctx.saved_tensors), ctx.shape, ctx.dtype)
        else:
            (kept,) = ctx.saved_tensors
        return ctx.spec.backward(grad_out, kept), None, None


class _MaskedMixin(MemorySavingModule):
    kind: str = ""
    shown_options = ("mask",)

    def forward(self, x: Tensor) -> Tensor:
        return self._apply_to(x, inplace=bool(getattr(self, "inplace", False)))

    def forward_inplace(self, x: Tensor) -> Tensor:
        """This layer's output computed in place on ``x``, whatever the layer's own ``inplace`` flag.

        For a caller that owns ``x`` and knows that nothing else reads it or keeps it for backward (see
        :class:`ondevice.ops.sequential.MemorySavingSequential`): same values and gradients as
        :meth:`forward`, without allocating the output. LeakyReLU with a negative slope, which stock
        autograd cannot differentiate in place, runs out of place.
        """
        negative = self.kind == "leaky_relu" and float(getattr(self, "negative_slope", 0.0)) < 0
        return self._apply_to(x, inplace=not negative)

    def _apply_to(self, x: Tensor, *, inplace: bool) -> Tensor:
        slope = float(getattr(self, "negative_slope", 0.0))
        # Stock, no Function: nothing to keep, or (a negative LeakyReLU slope) the sign of x is not in the
        # output, so a mask of it cannot be taken from there.
        if not (torch.is_grad_enabled() and x.requires_grad) or (self.kind == "leaky_relu" and slope < 0):
            return _activate(self.kind, x, slope, inplace)
        return _MaskedFn.apply(x, self.kind, slope, inplace, self.op_options.mask)


class MemorySavingReLU(_MaskedMixin, nn.ReLU):
    """``nn.ReLU`` that keeps a 1-bit (or 1-byte) mask for backward."""

    stock_type = nn.ReLU
    kind = "relu"


class MemorySavingReLU6(_MaskedMixin, nn.ReLU6):
    """``nn.ReLU6`` that keeps a 1-bit (or 1-byte) mask of ``0 < x < 6`` for backward."""

    stock_type = nn.ReLU6
    kind = "relu6"


class MemorySavingLeakyReLU(_MaskedMixin, nn.LeakyReLU):
    """``nn.LeakyReLU`` that keeps a 1-bit (or 1-byte) sign mask for backward (for a slope >= 0)."""

    stock_type = nn.LeakyReLU
    kind = "leaky_relu"


_SILU = _Smooth(F.silu, torch.ops.aten.silu_backward, False, STEP_DERIVATIVES["silu"])
_HARDSWISH = _Smooth(F.hardswish, torch.ops.aten.hardswish_backward, False, STEP_DERIVATIVES["hardswish"])
_SIGMOID = _Smooth(torch.sigmoid, torch.ops.aten.sigmoid_backward, True, STEP_DERIVATIVES["sigmoid"])
_TANH = _Smooth(torch.tanh, torch.ops.aten.tanh_backward, True, STEP_DERIVATIVES["tanh"])
_GELU = {
    approximate: _Smooth(
        partial(F.gelu, approximate=approximate),
        partial(torch.ops.aten.gelu_backward, approximate=approximate),
        keeps_output=False,
        step=STEP_DERIVATIVES["gelu" if approximate == "none" else "gelu_tanh"],
    )
    for approximate in ("none", "tanh")
}


class _SmoothMixin(MemorySavingModule):
    shown_options = ("compress",)

    def _spec(self) -> _Smooth:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        compress = self.op_options.compress
        if not (compress and torch.is_grad_enabled() and x.requires_grad) or getattr(self, "inplace", False):
            # exact: stock autograd keeps the same one tensor (the input; Sigmoid's and Tanh's output)
            return super().forward(x)  # type: ignore[safe-super]
        return _SmoothFn.apply(x, self._spec(), compress)


class MemorySavingSiLU(_SmoothMixin, nn.SiLU):
    """``nn.SiLU`` keeping its input for backward (optionally 8-bit compressed)."""

    stock_type = nn.SiLU

    def _spec(self) -> _Smooth:
        return _SILU


class MemorySavingGELU(_SmoothMixin, nn.GELU):
    """``nn.GELU`` keeping its input for backward (optionally 8-bit compressed)."""

    stock_type = nn.GELU

    def _spec(self) -> _Smooth:
        return _GELU[self.approximate]


class MemorySavingHardswish(_SmoothMixin, nn.Hardswish):
    """``nn.Hardswish`` keeping its input for backward (optionally 8-bit compressed)."""

    stock_type = nn.Hardswish

    def _spec(self) -> _Smooth:
        return _HARDSWISH


class MemorySavingSigmoid(_SmoothMixin, nn.Sigmoid):
    """``nn.Sigmoid`` keeping its output for backward (optionally 8-bit compressed)."""

    stock_type = nn.Sigmoid

    def _spec(self) -> _Smooth:
        return _SIGMOID


class MemorySavingTanh(_SmoothMixin, nn.Tanh):
    """``nn.Tanh`` keeping its output for backward (optionally 8-bit compressed)."""

    stock_type = nn.Tanh

    def _spec(self) -> _Smooth:
        return _TANH


# ------------------------------------------------------------------------------- library activations


class _DerivedFn(torch.autograd.Function):
    """An elementwise activation keeping only its input; backward differentiates the layer's own forward.

    Forward runs ``fn`` (the library layer's forward) without building a graph and keeps its input
    (optionally 8-bit compressed). Backward evaluates ``fn`` once more on the kept input with autograd
    and takes its vector-Jacobian product: the very kernels, in the same order, that stock autograd runs
    over the graph it kept, so gradients are stock's. Stock keeps every intermediate of the expression
    (GPT-2's ``NewGELUActivation`` keeps five tensors the size of its input); this keeps one.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        fn: Callable[[Tensor], Tensor],
        compress: CompressMode | None,
        step: StepDerivative | None,
    ) -> Tensor:
        with torch.no_grad():
            y = fn(x)
        ctx.fn, ctx.compress = fn, compress is not None
        if _keep_2bit(ctx, x, compress, step):
            pass
        elif compress:
            ctx.shape, ctx.dtype = x.shape, x.dtype
            ctx.save_for_backward(*compress_int8(x))
        else:
            ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.step is not None:
            return step_grad(grad_out, ctx.saved_tensors[0], ctx.step, ctx.shape), None, None, None
        if ctx.compress:
            x = decompress_int8(Compressed(*ctx.saved_tensors), ctx.shape, ctx.dtype)
        else:
            (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            (grad_x,) = torch.autograd.grad(ctx.fn(x), x, grad_out)
        return grad_x, None, None, None


_MISH = _Smooth(F.mish, torch.ops.aten.mish_backward, keeps_output=False)


class _LibraryActivationOp(MemorySavingModule):
    """A library's activation layer: a fused ATen op where its forward is one, else :class:`_DerivedFn`."""

    shown_options = ("compress",)
    step: ClassVar[StepDerivative | None] = None  # the 2-bit derivative of the layer's function, if known

    def _spec(self) -> _Smooth | None:
        """The fused op this layer's forward calls, or ``None`` (an expression of several ops)."""
        return None

    def forward(self, x: Tensor) -> Tensor:
        library_forward = super().forward  # type: ignore[misc]
        if not (torch.is_grad_enabled() and x.requires_grad):
            return library_forward(x)
        compress = self.op_options.compress
        spec = self._spec()
        if spec is None:
            return _DerivedFn.apply(x, library_forward, compress, self.step)
        if not compress:
            return library_forward(x)  # one fused op: stock keeps its input alone, as _SmoothFn would
        return _SmoothFn.apply(x, spec, compress)


def _calls(act: object, fn: Callable[..., Tensor], **keywords: object) -> bool:
    """Whether ``act`` is ``fn`` itself, or ``functools.partial(fn, **keywords)``."""
    if not keywords:
        return act is fn
    return isinstance(act, partial) and act.func is fn and not act.args and act.keywords == keywords


class _HFGELUOp(_LibraryActivationOp):
    library_layer = "transformers.activations.GELUActivation"
    step = STEP_DERIVATIVES["gelu"]  # its Python fallback computes the same function

    def _spec(self) -> _Smooth | None:
        return _GELU["none"] if _calls(getattr(self, "act", None), F.gelu) else None


class _HFGELUTanhOp(_LibraryActivationOp):
    library_layer = "transformers.activations.GELUTanh"
    step = STEP_DERIVATIVES["gelu_tanh"]

    def _spec(self) -> _Smooth | None:
        return _GELU["tanh"] if _calls(getattr(self, "act", None), F.gelu, approximate="tanh") else None


class _HFSiLUOp(_LibraryActivationOp):
    library_layer = "transformers.activations.SiLUActivation"

    def _spec(self) -> _Smooth | None:
        return _SILU


class _HFMishOp(_LibraryActivationOp):
    library_layer = "transformers.activations.MishActivation"

    def _spec(self) -> _Smooth | None:
        return _MISH if _calls(getattr(self, "act", None), F.mish) else None


class _HFLinearOp(MemorySavingModule):
    """transformers ``LinearActivation`` (the identity: keeps nothing) running its own forward."""

    library_layer = "transformers.activations.LinearActivation"


class _TimmGELUOp(_LibraryActivationOp):
    library_layer = "timm.layers.activations.GELU"

    def _spec(self) -> _Smooth | None:
        return _GELU["none"]


class _TimmGELUTanhOp(_LibraryActivationOp):
    library_layer = "timm.layers.activations.GELUTanh"

    def _spec(self) -> _Smooth | None:
        return _GELU["tanh"]


def _derived(path: str, step: str | None = None) -> type[_LibraryActivationOp]:
    """An op for the library activation ``path`` whose forward is an elementwise expression of ATen ops.

    ``step`` names its 2-bit derivative in ``STEP_DERIVATIVES`` (the tanh forms of GELU: ``gelu_tanh``).
    """
    name = path.rsplit(".", 1)[1]
    namespace = {"library_layer": path, "__module__": __name__, "step": step and STEP_DERIVATIVES[step]}
    return type(f"_{name}Op", (_LibraryActivationOp,), namespace)


_TRANSFORMERS = "transformers 5.25.0"
# Fingerprints of the library source each op mirrors (see registry.source_fingerprint); a test checks them.
_LIBRARY_ACTIVATIONS: tuple[tuple[type[MemorySavingModule], str, str], ...] = (
    (_HFGELUOp, "3528c860738e7d27", _TRANSFORMERS),
    (_HFGELUTanhOp, "3528c860738e7d27", _TRANSFORMERS),
    (_HFSiLUOp, "b85459ec4f3f4ec8", _TRANSFORMERS),
    (_HFMishOp, "3528c860738e7d27", _TRANSFORMERS),
    (_derived("transformers.activations.NewGELUActivation", "gelu_tanh"), "e6e5d7f710148701", _TRANSFORMERS),
    (_derived("transformers.activations.FastGELUActivation", "gelu_tanh"), "e4d9066444c86da9", _TRANSFORMERS),
    (_derived("transformers.activations.QuickGELUActivation"), "d626f6578d947ed6", _TRANSFORMERS),
    (_derived("transformers.activations.ClippedGELUActivation"), "8bc1962bb5ba2894", _TRANSFORMERS),
    (
        _derived("transformers.activations.AccurateGELUActivation", "gelu_tanh"),
        "914f922922d52bc5",
        _TRANSFORMERS,
    ),
    (_derived("transformers.activations.LaplaceActivation"), "568748c14380d34f", _TRANSFORMERS),
    (_derived("transformers.activations.ReLUSquaredActivation"), "af786f78dc2bb1fe", _TRANSFORMERS),
    (_derived("transformers.activations.SqrtSoftplusActivation"), "9f79beb9bc42bf49", _TRANSFORMERS),
    (_HFLinearOp, "f8307c13c74090c4", _TRANSFORMERS),
    (_TimmGELUOp, "1e20d2c4ece48b46", "timm 1.0.31"),
    (_TimmGELUTanhOp, "60d82bcf630e5276", "timm 1.0.31"),
)


for _cls in (
    MemorySavingReLU,
    MemorySavingReLU6,
    MemorySavingLeakyReLU,
    MemorySavingSiLU,
    MemorySavingGELU,
    MemorySavingHardswish,
    MemorySavingSigmoid,
    MemorySavingTanh,
):
    register_op(_cls.stock_type, _cls.from_module)
for _op, _fingerprint, _written_for in _LIBRARY_ACTIVATIONS:
    register_op(_op.library_layer, _op.from_module, fingerprint=_fingerprint, written_for=_written_for)
