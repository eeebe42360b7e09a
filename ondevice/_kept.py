"""What given layers keep for backward on one batch, counted on fake tensors (no data, no compute).

prepare uses it to say what the layers that run on stock autograd cost. The count is the one
``memory.measure`` makes (every storage autograd saves while the layer's own forward runs, each storage
once, parameters and buffers excluded), on a fake copy of the batch that ``ondevice._example`` describes,
so the model's own tensors are never touched: parameters and buffers are swapped for fake ones for the
call (``torch.func.functional_call``), which also keeps train-mode norm statistics unchanged.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ondevice._example import ExampleSpec

__all__ = ["kept_bytes", "outputs_kept_by_others", "storage_key"]


def storage_key(t: Tensor) -> int | None:
    """An id of ``t``'s underlying storage, unique among live storages (``None`` if it has none).

    Uses the storage implementation's address (``UntypedStorage._cdata``) rather than ``data_ptr()``,
    which fake and meta tensors do not have.
    """
    try:
        return int(t.untyped_storage()._cdata)
    except (RuntimeError, NotImplementedError):  # sparse, mkldnn and other storage-less layouts
        return None


def _fake_run(
    model: nn.Module,
    example: ExampleSpec,
    pack: Callable[[Tensor, bool], None],
    hooks: dict[str, tuple[Callable[..., None], Callable[..., None]]],
) -> None:
    """Run ``model`` once on a fake batch shaped like ``example``, with fake copies of its parameters and
    buffers, calling ``pack(t, counted)`` for each tensor autograd saves (``counted``: not a parameter or
    buffer) and the given forward pre/post hooks of named modules."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    state: dict[str, Tensor] = {}
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        fake = mode.from_tensor(tensor.detach())
        state[name] = fake.requires_grad_(tensor.requires_grad) if tensor.is_floating_point() else fake
    excluded = {key for key in (storage_key(t) for t in state.values()) if key is not None}

    def on_save(t: Tensor) -> Tensor:
        key = storage_key(t)
        pack(t, key is not None and key not in excluded)
        return t.detach()

    handles = []
    for name, (enter, leave) in hooks.items():
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    device = next((t.device for t in state.values()), torch.device("cpu"))
    try:
        with mode, torch.autograd.graph.saved_tensors_hooks(on_save, lambda t: t):
            batch = example.empty(device=device)
            torch.func.functional_call(model, state, (batch,))
    finally:
        for handle in handles:
            handle.remove()


def kept_bytes(model: nn.Module, names: Sequence[str], example: ExampleSpec) -> dict[str, int]:
    """Bytes each named module's own forward keeps for backward on a batch shaped like ``example``.

    A module nested in another named one counts towards the inner one only.
    """
    saved: dict[int, tuple[int, str]] = {}
    stack = [""]

    def pack(t: Tensor, counted: bool) -> None:
        key = storage_key(t)
        if counted and key is not None and key not in saved:
            saved[key] = (t.untyped_storage().nbytes(), stack[-1])

    def enter(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            stack.append(name)

        return hook

    def leave(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if stack[-1] == name:
                stack.pop()

        return hook

    _fake_run(model, example, pack, {name: (enter(name), leave(name)) for name in names})
    totals = dict.fromkeys(names, 0)
    for nbytes, owner in saved.values():
        if owner in totals:
            totals[owner] += nbytes
    return totals


def outputs_kept_by_others(model: nn.Module, names: Sequence[str], example: ExampleSpec) -> list[str]:
    """The named modules whose output (its storage) another op keeps for backward, on a fake training
    step's forward on a batch shaped like ``example`` (the model in training mode for the run)."""
    outputs: dict[str, int] = {}
    saved: set[int] = set()
    alive: list[Tensor] = []  # the saved tensors stay alive, so no later storage reuses their keys
    inside: list[str] = []

    def pack(t: Tensor, counted: bool) -> None:
        key = storage_key(t)
        if counted and key is not None and not inside:
            saved.add(key)
            alive.append(t)

    def enter(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            inside.append(name)

        return hook

    def leave(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if inside and inside[-1] == name:
                inside.pop()
            if isinstance(output, Tensor):
                key = storage_key(output)
                if key is not None:
                    outputs[name] = key
                    alive.append(output)

        return hook

    modes = {module: module.training for module in model.modules()}
    try:
        model.train()
        _fake_run(model, example, pack, {name: (enter(name), leave(name)) for name in names})
    finally:
        for module, training in modes.items():
            module.training = training
    return [name for name in names if outputs.get(name) in saved]
