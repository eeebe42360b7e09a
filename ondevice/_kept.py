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
    names: Sequence[str],
    pack: Callable[[Tensor, bool, str], None],
    on_output: Callable[[str, Any], None] | None = None,
) -> None:
    """Run ``model`` once on a fake batch shaped like ``example``, with fake copies of its parameters and
    buffers. ``pack(t, counted, owner)`` sees each tensor autograd saves: ``counted`` when it is not a
    parameter or buffer, ``owner`` the innermost named module whose forward is running ("" for none).
    ``on_output(name, output)`` sees each named module's output."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    state: dict[str, Tensor] = {}
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        fake = mode.from_tensor(tensor.detach())
        state[name] = fake.requires_grad_(tensor.requires_grad) if tensor.is_floating_point() else fake
    excluded = {key for key in (storage_key(t) for t in state.values()) if key is not None}
    stack = [""]

    def on_save(t: Tensor) -> Tensor:
        key = storage_key(t)
        pack(t, key is not None and key not in excluded, stack[-1])
        return t.detach()

    def enter(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            stack.append(name)

        return hook

    def leave(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if stack[-1] == name:
                stack.pop()
            if on_output is not None:
                on_output(name, output)

        return hook

    handles = []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave(name), always_call=True))
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

    def pack(t: Tensor, counted: bool, owner: str) -> None:
        key = storage_key(t)
        if counted and key is not None and key not in saved:
            saved[key] = (t.untyped_storage().nbytes(), owner)

    _fake_run(model, example, names, pack)
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

    def pack(t: Tensor, counted: bool, owner: str) -> None:
        key = storage_key(t)
        if counted and key is not None and not owner:  # saved outside the named modules' own forwards
            saved.add(key)
            alive.append(t)

    def on_output(name: str, output: Any) -> None:
        key = storage_key(output) if isinstance(output, Tensor) else None
        if key is not None:
            outputs[name] = key
            alive.append(output)

    modes = {module: module.training for module in model.modules()}
    try:
        model.train()
        _fake_run(model, example, names, pack, on_output)
    finally:
        for module, training in modes.items():
            module.training = training
    return [name for name in names if outputs.get(name) in saved]
