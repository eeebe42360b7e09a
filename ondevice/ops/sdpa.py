"""Attention that keeps q, k and v only: the output and log-sum-exp are recomputed in backward.

Stock autograd keeps five tensors for ``F.scaled_dot_product_attention`` on the CPU's flash kernel: q, k,
v, the output and the per-row log-sum-exp. The output is there for one row sum (``D = rowsum(dO * O)``)
and the log-sum-exp to rebuild the softmax; both come again, bit for bit, from one more forward of the
same kernel on the kept q, k and v. So :class:`_LeanSDPA` keeps q, k, v, and in backward runs the flash
kernel's forward once more and then its own backward (``_scaled_dot_product_flash_attention_for_cpu``
and ``..._backward``, exactly what stock autograd runs): the gradients are stock's bit for bit, for one
more attention product per layer (``4 N^2 d`` FLOPs for ``N`` tokens of width ``d``, a few per cent of a
layer's ``24 N d^2`` at these sizes). It saves one hidden-size tensor per attention layer, a quarter of
what attention keeps: on a bias-only ViT, whose frozen projections keep nothing, that is 1/8 of the step.

It applies where stock attention would run the CPU flash kernel (``torch._fused_sdp_choice``), with no
dropout, no boolean mask, no grouped-query broadcast and no gradient wanted for the mask; every other
call (CUDA, the math path, dropout in training) runs stock ``F.scaled_dot_product_attention`` unchanged.

Which modules call it: the attention modules of the libraries call ``F.scaled_dot_product_attention``
inside their own ``forward`` (transformers through its attention-function registry, timm directly).
``nn.MultiheadAttention`` is left as stock: it calls it inside ``F.multi_head_attention_forward``, itself
a function that torch-function modes intercept, and a mode is off while it handles a call, so the inner
call is out of its reach. :func:`attention_callers` finds
the modules whose class's ``forward`` names one of those, and ``convert`` makes each a
:class:`MemorySavingAttention` twin, whose ``forward`` runs the class's own under a
``TorchFunctionMode`` that routes that one function here (only inside those modules, so the rest of the
model runs without a Python mode). Parameters, buffers, ``state_dict`` keys and the class's other methods
are unchanged, as for every op.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ondevice.ops.registry import MemorySavingModule, clone_module_as

__all__ = ["MemorySavingAttention", "attention_callers", "keep_attention", "lean_attention", "lean_sdpa"]

_FLASH = 1  # torch._fused_sdp_choice's index of SDPBackend.FLASH_ATTENTION
_CALLS = frozenset({"scaled_dot_product_attention", "ALL_ATTENTION_FUNCTIONS", "attention_interface"})
"""Names whose presence in a class's ``forward`` marks it as (possibly) calling SDPA itself."""

_aten = torch.ops.aten
_FLASH_OPS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
)
_AVAILABLE = all(hasattr(_aten, name) for name in _FLASH_OPS) and hasattr(torch, "_fused_sdp_choice")
"""Whether this torch has the CPU flash kernel as its own ops (the package allows older torch: stock then)."""
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)
_KEEP = ContextVar("ondevice_keep_attention", default=False)


@contextmanager
def keep_attention() -> Iterator[None]:
    """Within it, attention keeps what stock keeps (its output and log-sum-exp too): in a block that is
    recomputed in backward, whose kept tensors live only while that block's backward runs, recomputing
    the attention a second time would cost compute and save nothing that lasts."""
    token = _KEEP.set(True)
    try:
        yield
    finally:
        _KEEP.reset(token)


def _half(t: Tensor) -> Tensor:
    """``t`` in float16 where it is float32 and fits float16's range (checked on real tensors, on the half
    copy: a value beyond the range became infinite; an estimate's fake ones are taken to fit), else ``t``."""
    if t.dtype != torch.float32:
        return t
    half = t.to(torch.float16)
    if not isinstance(t, FakeTensor):
        low, high = torch.aminmax(half)  # no temporary the size of t
        if bool(torch.isinf(high)) or bool(torch.isinf(low)):
            return t
    return half


class _LeanSDPA(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float | None,
        half: bool = False,
    ) -> Tensor:  # fmt: skip
        out, _ = _aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale
        )
        if half:
            q, k, v = _half(q), _half(k), _half(v)
        ctx.save_for_backward(q, k, v, mask)
        ctx.is_causal, ctx.scale, ctx.dtype = is_causal, scale, out.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v = (t.to(ctx.dtype) for t in ctx.saved_tensors[:3])
        mask = ctx.saved_tensors[3]
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, ctx.is_causal, attn_mask=mask, scale=ctx.scale
        )
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, ctx.is_causal, attn_mask=mask, scale=ctx.scale
        )
        return dq, dk, dv, None, None, None, None


def lean_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    half: bool = False,
) -> Tensor | None:
    """``F.scaled_dot_product_attention(...)`` keeping only q, k and v, or ``None`` where it does not apply
    (then the caller runs the stock function): not the CPU flash kernel, dropout, a boolean or
    differentiable mask, grouped-query broadcast, no gradient wanted, or a forward that backward runs (a
    recomputed block's, whose kept tensors live only until its backward is done). With ``half`` (the lossy
    ``compress`` modes) it keeps q, k and v in float16 where they fit its range: half the bytes, and a
    gradient taken at inputs rounded to 11 significant bits."""
    if not _AVAILABLE or dropout_p != 0.0 or enable_gqa or not torch.is_grad_enabled():
        return None
    if _KEEP.get() or _graph_task_id() != -1:  # a recomputed block's, or a forward backward runs: transient
        return None
    if not any(t.requires_grad for t in (query, key, value)):
        return None
    if query.device.type != "cpu" or query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return None
    if attn_mask is not None and (attn_mask.dtype == torch.bool or attn_mask.requires_grad):
        return None
    if _kernel_choice(query, key, value, attn_mask, is_causal, scale) != _FLASH:
        return None
    return _LeanSDPA.apply(query, key, value, attn_mask, is_causal, scale, half)  # type: ignore[no-any-return]


def _kernel_choice(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, is_causal: bool, scale: float | None
) -> int:
    """The kernel stock attention picks for these inputs. The choice reads only their metadata, so the
    Python dispatch key is left out: on fake tensors (``memory.estimate``) it is then the choice for the
    real ones, as stock attention's own, instead of the fake mode's answer (the math path)."""
    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.Python)):
        return int(torch._fused_sdp_choice(query, key, value, mask, 0.0, is_causal, scale=scale))


class _Route(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to :func:`lean_sdpa`; everything else runs as called."""

    def __init__(self, half: bool = False) -> None:
        super().__init__()
        self.half = half

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out = lean_sdpa(*args, **kwargs, half=self.half)
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextmanager
def lean_attention(half: bool = False) -> Iterator[None]:
    """Within it, ``F.scaled_dot_product_attention`` keeps q, k and v only where :func:`lean_sdpa` applies
    (in float16 with ``half``)."""
    with _Route(half):
        yield


def _forward_names(cls: type) -> set[str]:
    """The global and attribute names the code of ``cls.forward`` uses (through decorators' ``__wrapped__``:
    transformers wraps its forwards)."""
    forward = cls.__dict__.get("forward")
    if forward is None:
        return set()
    code = getattr(inspect.unwrap(forward), "__code__", None)
    return set(code.co_names) if isinstance(code, types.CodeType) else set()


_CALLERS: dict[type, bool] = {}


def _calls_attention(cls: type[nn.Module]) -> bool:
    """Whether the ``forward`` ``cls`` runs (its own or the nearest base's) names an attention call (read
    once per class: ``convert`` asks for every module of every model it converts)."""
    if cls not in _CALLERS:
        owner = next((base for base in cls.__mro__ if "forward" in base.__dict__), None)
        _CALLERS[cls] = owner is not None and bool(_forward_names(owner) & _CALLS)
    return _CALLERS[cls]


def attention_callers(model: nn.Module) -> list[str]:
    """Qualified names of the submodules of ``model`` (not ``model`` itself) whose ``forward`` may call SDPA
    itself (see the module docstring) and that are not yet :class:`MemorySavingAttention` (nor layers with
    an op of their own)."""
    return [
        name
        for name, module in model.named_modules()
        if name
        and not isinstance(module, MemorySavingAttention | MemorySavingModule)
        and _calls_attention(type(module))
    ]


class MemorySavingAttention(nn.Module):
    """Mixed into an attention module's class (by ``twin_class``): its own ``forward``, run under
    :func:`lean_attention`; ``half_attention`` (set by ``convert`` under a lossy ``compress`` mode) keeps
    q, k and v in float16."""

    stock_type: ClassVar[type[nn.Module]] = nn.Module
    half_attention: bool = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if _KEEP.get():  # in a recomputed block: stock attention, without the function mode's cost
            return super().forward(*args, **kwargs)
        with lean_attention(self.half_attention):
            return super().forward(*args, **kwargs)

    def to_stock(self) -> nn.Module:
        """The module this one replaced, with the same parameters, buffers and children."""
        stock = clone_module_as(self, self.stock_type)
        stock.__dict__.pop("half_attention", None)
        return stock
