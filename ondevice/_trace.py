"""Shapes of what chosen submodules receive and return, from one forward pass on a batch of one.

Lite residual branches take their geometry (channels, stride, 1-D or 2-D) from what a block does, not from
attributes a block may or may not state. :func:`trace_shapes` runs the model once on a batch of zeros
(batch 1, no autograd) with forward hooks on the named modules, in eval mode, and restores every module's
training flag and removes the hooks afterwards. A real forward, not one on fake tensors: fake and meta
tensors import ``torch._dynamo`` and sympy, which add about 88 MiB to the process of a device that
prepares its model (measured, issue 19), where one small forward costs a few MiB for a moment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ondevice._example import ExampleSpec
from ondevice.errors import ConfigError

__all__ = ["CallShapes", "trace_shapes"]


@dataclass(frozen=True)
class CallShapes:
    """What one module was called with and returned during the traced forward.

    Attributes:
        calls: how often the module ran (a branch needs exactly one call).
        input_shape: the shape of its only tensor argument, or None if it took anything else (several
            tensors, keyword tensors, a non-tensor).
        output_shape: the shape of its output if that is a single tensor, else None.
    """

    calls: int
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None


def _single_tensor(args: tuple[object, ...], kwargs: dict[str, object]) -> Tensor | None:
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    if len(args) == 1 and not kwargs and len(tensors) == 1:
        return tensors[0]
    return None


def trace_shapes(model: nn.Module, names: Sequence[str], example: ExampleSpec) -> dict[str, CallShapes]:
    """Run ``model`` once on a batch of zeros of ``example``'s shape and record the named modules' calls.

    Nothing changes in the model: it runs in eval mode without autograd, every module's ``training``
    flag is restored and every hook removed, also when the forward fails.

    Raises:
        ConfigError: the model's forward fails on a batch of that shape (the message says how to pass a
            different one).
    """
    seen: dict[str, list[tuple[tuple[int, ...] | None, tuple[int, ...] | None]]] = {n: [] for n in names}

    def hook_for(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object], out: object) -> None:
            given = _single_tensor(args, kwargs)
            seen[name].append(
                (
                    tuple(given.shape) if given is not None else None,
                    tuple(out.shape) if isinstance(out, Tensor) else None,
                )
            )

        return hook

    modes = {module: module.training for module in model.modules()}
    handles = [
        model.get_submodule(name).register_forward_hook(hook_for(name), with_kwargs=True) for name in names
    ]
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    try:
        model.eval()
        with torch.no_grad():
            batch = example.empty(device=device)
            model(batch.zero_() if batch.is_floating_point() else batch)
    except Exception as exc:  # any failure of the user's forward is reported with how to fix it
        raise ConfigError(
            f"tracing {type(model).__name__} on a batch of {example.describe()} failed "
            f"({type(exc).__name__}: {str(exc)[:200]}); pass the batch shape the model takes, e.g. "
            f"prepare(..., example_input=(1, 3, 224, 224))"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    result: dict[str, CallShapes] = {}
    for name, calls in seen.items():
        shapes = calls[0] if len(calls) == 1 else (None, None)
        result[name] = CallShapes(len(calls), shapes[0], shapes[1])
    return result
