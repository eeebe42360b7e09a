"""The compute of a training step, counted op by op: the FLOPs of its matrix products and convolutions.

:class:`FlopCount` is a dispatch mode that adds up, for every matmul, convolution and attention op the
step runs (forward, backward and whatever backward runs again, e.g. recomputed blocks), the FLOPs of
``torch.utils.flop_counter``'s formulas (a multiply-add counts 2). It runs on fake tensors as well as
real ones, so :func:`memory.estimate` reports a step's compute next to its memory without running it,
and the planner can weigh an option that saves memory by computing more (recomputation).

Elementwise ops, norms and the optimizer step are not counted: on the models this SDK trains they are a
few per cent of the products' FLOPs, and they cost the same in every option the planner compares.

``torch.utils.flop_counter.FlopCounterMode`` itself is not used: it has no formula for the CPU's flash
attention, and it tracks modules with hooks of its own, which this count does not need.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["FlopCount"]

_aten = torch.ops.aten


def _cpu_flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return int(sdpa_flop_count(query.shape, key.shape, value.shape))


def _cpu_flash_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *args: Any,
    **kwargs: Any,
) -> int:
    return int(sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape))


@functools.cache
def _formulas() -> dict[Any, Callable[..., int]]:
    """torch's formulas and the CPU flash ones, by op (built once per process)."""
    formulas: dict[Any, Callable[..., int]] = dict(flop_registry)
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_backward),
    ):
        packet = getattr(_aten, name, None)
        if packet is not None:
            formulas[packet] = formula
    return formulas


class FlopCount(TorchDispatchMode):
    """Count the FLOPs of the matmuls, convolutions and attention ops run inside ``with FlopCount() as c``.

    ``c.total`` is the sum; ``c.by_op`` the same split by op name. Works under ``FakeTensorMode``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_op: dict[str, int] = {}
        self._formulas = _formulas()

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self._formulas.get(func._overloadpacket)
        if formula is not None:
            flops = int(formula(*args, **kwargs, out_val=out))
            self.total += flops
            name = func._overloadpacket.__name__
            self.by_op[name] = self.by_op.get(name, 0) + flops
        return out
