"""Exact recomputation, block by block: keep a block's inputs, recompute the rest in backward.

``prepare(..., recompute=True)`` (or a tuple of block names) turns each chosen block into a
:class:`RecomputedBlock`: a twin of the block's own class (as :func:`ondevice.ops.twin_class` makes them
for layers), so the block keeps its name, its parameters, its other methods and its ``state_dict`` keys.

Its forward builds the block's autograd graph as stock PyTorch does, under saved-tensor hooks that hold
each tensor the graph saves in a slot (:class:`_Call`). When the forward returns, every slot whose tensor
is not alive anyway (an input, an output, a parameter or a buffer of the block) lets its tensor go, and
:class:`_Hold`, an identity on the block's outputs, keeps the block's inputs through ``save_for_backward``
(so ``memory.measure`` and ``memory.estimate`` see exactly what is kept). Backward reaches ``_Hold`` before
any node of the block: it runs the block again from its inputs under the forward's random-number state and
refills the slots, and stops as soon as the last one it needs is back, so the ops after it (a block's last
projection, its residual sum, its closing norm) do not run again. The block's own nodes then run their
stock backward. The gradients are those of the block run once (Chen et al. 2016, "Training Deep Nets with
Sublinear Memory Cost", Sec. 3; ``torch.utils.checkpoint``'s non-reentrant mode works the same way, but
keeps its inputs where saved-tensor hooks cannot count them). The price is one more forward of each
recomputed block, up to the last tensor its backward needs.

Inside a recomputed block what the ops keep lives only while its backward runs, so they run for speed:
attention keeps its output and log-sum-exp rather than computing them a third time
(:func:`ondevice.ops.sdpa.keep_attention`), and a LayerNorm keeps its output where that recovers its input
exactly (:func:`ondevice.ops.norm.share_norm_output`): a post-norm block (BERT's) then ends with a tensor
kept anyway, and its recomputation stops before its feed-forward's second projection. Small tensors saved
after the last large one (a norm's statistics) are kept rather than recomputed, for the same reason.
Gradients equal stock's to float rounding (relative 1e-7; the norm's input comes back as ``(y - b) / w``).

Blocks (:func:`find_blocks`): the zoo's registered blocks; else the repeated layers of a model -- the
modules that are an element of a ``ModuleList``/``Sequential`` beside others of their type and hold at
least two weight layers (a transformer's encoder/decoder layers, a CNN's residual stages' blocks), the
innermost such; else the residual blocks lite residual branches attach to.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ondevice._example import ExampleSpec
from ondevice._kept import storage_key
from ondevice.errors import ConfigError
from ondevice.models.blocks import block_types
from ondevice.ops.norm import share_norm_output
from ondevice.ops.registry import clone_module_as, twin_class
from ondevice.ops.sdpa import keep_attention
from ondevice.schemes._tree import leaves, replace_submodule
from ondevice.schemes.lite_residual import residual_blocks

__all__ = [
    "RecomputeChoice",
    "RecomputeConflictError",
    "RecomputedBlock",
    "apply_recompute",
    "check_recompute_choice",
    "find_blocks",
    "recomputed_blocks",
    "resolve_recompute",
]

logger = logging.getLogger(__name__)

RecomputeChoice = bool | Sequence[str]
"""``True`` (every block :func:`find_blocks` finds), ``False`` (none) or the qualified names of blocks."""

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _is_weight_layer(module: nn.Module) -> bool:
    """A leaf holding a weight of two or more dims (Linear, Conv, Embedding, transformers' Conv1D)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and weight.dim() >= 2


def _outermost(names: list[str]) -> list[str]:
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _repeated_layers(model: nn.Module, head: str | None) -> list[str]:
    """Innermost ModuleList/Sequential elements beside another of their type, with >= 2 weight layers."""
    weights: dict[str, int] = {}
    for name, module in leaves(model):
        if _is_weight_layer(module):
            parts = name.split(".")
            for depth in range(1, len(parts)):
                prefix = ".".join(parts[:depth])
                weights[prefix] = weights.get(prefix, 0) + 1
    found: list[str] = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.ModuleList | nn.Sequential):
            continue
        children = list(parent.named_children())
        for child_name, child in children:
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if head is not None and (name == head or head.startswith(name + ".")):
                continue
            if weights.get(name, 0) >= 2 and sum(type(c) is type(child) for _, c in children) > 1:
                found.append(name)
    return [n for n in found if not any(o.startswith(n + ".") for o in found)]


def find_blocks(model: nn.Module, head: str | None = None) -> list[str]:
    """Qualified names of the blocks ``recompute=True`` recomputes, in forward (registration) order.

    The zoo's registered blocks; else the model's repeated layers (see the module docstring); else the
    residual blocks of a CNN (``ondevice.schemes.lite_residual.residual_blocks``), leaving out single
    layers. The head and the blocks holding it are never chosen. Empty when the model has no blocks.
    """
    registered = [n for n, m in model.named_modules() if n and isinstance(m, block_types())]
    if registered:
        chosen = _outermost(registered)
    else:
        chosen = _repeated_layers(model, head) or [
            n for n in residual_blocks(model, head) if any(True for _ in model.get_submodule(n).children())
        ]
    return [n for n in chosen if head is None or not (n == head or head.startswith(n + "."))]


class RecomputeConflictError(ConfigError):
    """A recomputed block was called with something its recomputation would change a second time."""


class _Replay:
    """What a block's recomputation needs besides its saved inputs: the call's structure and RNG state."""

    def __init__(self, block: RecomputedBlock, spec: TreeSpec, leaves_: list[Any], slots: list[int]) -> None:
        self.block = block
        self.spec = spec
        self.leaves = leaves_  # non-tensor leaves of (args, kwargs); tensor slots are None
        self.slots = slots  # positions of the tensor leaves
        self.cpu_rng: Tensor | None = None
        self.cuda_rng: dict[int, Tensor] = {}
        self.autocast: dict[str, tuple[bool, torch.dtype]] = {}

    def capture(self, tensors: Sequence[Tensor]) -> None:
        """Keep the random-number and autocast state the block's forward starts from."""
        self.cpu_rng = torch.get_rng_state()
        for t in tensors:
            if t.device.type == "cuda" and t.device.index not in self.cuda_rng:
                index = t.device.index if t.device.index is not None else torch.cuda.current_device()
                self.cuda_rng[index] = torch.cuda.get_rng_state(index)
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                self.autocast[device] = (True, torch.get_autocast_dtype(device))

    def run(self, tensors: Sequence[Tensor]) -> Any:
        flat = list(self.leaves)
        for slot, t in zip(self.slots, tensors, strict=True):
            flat[slot] = t
        args, kwargs = tree_unflatten(flat, self.spec)
        return self.block.stock_type.forward(self.block, *args, **kwargs)

    @contextmanager
    def replayed(self) -> Iterator[None]:
        """The RNG and autocast state of the forward."""
        with torch.random.fork_rng(devices=list(self.cuda_rng)), _autocast(self.autocast):
            if self.cpu_rng is not None:
                torch.set_rng_state(self.cpu_rng)
            for index, state in self.cuda_rng.items():
                torch.cuda.set_rng_state(state, index)
            yield


@contextmanager
def _autocast(states: dict[str, tuple[bool, torch.dtype]]) -> Iterator[None]:
    if not states:
        yield
        return
    device, (_, dtype) = next(iter(states.items()))
    with torch.autocast(device_type=device, dtype=dtype):
        yield


@contextmanager
def _norm_stats(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Put back the running statistics a recomputation in training mode updates a second time."""
    norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._NormBase)]
    norms = [m for m in norms if m.training and m.track_running_stats]
    kept = [{k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in zip(norms, kept, strict=True):
                for key, value in buffers.items():
                    getattr(module, key).copy_(value)


@contextmanager
def _transient(inputs: Sequence[Tensor]) -> Iterator[None]:
    """How a recomputed block's ops run: what they keep lives only until the block's backward is done, so
    attention keeps its output rather than computing it again, and a LayerNorm keeps its output (the
    block's own, for a norm that ends the block: kept anyway, so the recomputation stops before it)."""
    with keep_attention(), share_norm_output(inputs):
        yield


class _StopRecompute(Exception):  # noqa: N818 (a signal, not an error)
    """Raised inside a recomputation once every tensor backward still needs has come again."""


class _Slot:
    """One tensor the block's forward saved for backward: kept (an input, an output, a parameter or a
    buffer: alive anyway) or dropped at the end of the forward and refilled by the recomputation."""

    __slots__ = ("dropped", "meta", "tensor", "unpacked")

    def __init__(self, t: Tensor) -> None:
        self.tensor: Tensor | None = t
        self.meta = (t.shape, t.dtype, t.device)
        self.dropped = False
        self.unpacked = False


class _Call:
    """One forward of a recomputed block: the tensors its autograd graph saved, in the order it saved them.

    The forward builds the block's graph as stock autograd does, under saved-tensor hooks that put each
    saved tensor in a :class:`_Slot`; when it returns, :meth:`release` drops every slot that is not alive
    anyway. :meth:`recompute` (from :class:`_Hold`'s backward, before any node of the block runs) runs the
    block again from its inputs under the forward's random state and refills the dropped slots, stopping
    as soon as the last of them is refilled: the ops after it (a block's last projection, a residual sum)
    do not run again. Each node unpacks its slot once, which then lets the tensor go.
    """

    def __init__(self, replay: _Replay, inputs: Sequence[Tensor], modules: Sequence[nn.Module]) -> None:
        self.replay = replay
        self.slots: list[_Slot] = []
        self.needs = [t.requires_grad for t in inputs]
        self.modules = modules  # the block's, for the norms whose statistics a recomputation puts back

    def pack(self, t: Tensor) -> _Slot:
        slot = _Slot(t)
        self.slots.append(slot)
        return slot

    def unpack(self, slot: _Slot) -> Tensor:
        t = slot.tensor
        if t is None and slot.unpacked:
            raise RuntimeError(
                f"a tensor saved inside {self.replay.block.stock_type.__name__} (recomputed in backward) "
                f"was read twice in one backward (a custom autograd Function reading ctx.saved_tensors "
                f"twice), and a recomputed block lets each go once read; read them once, or prepare with "
                f"recompute=False"
            )
        if t is None:
            raise RuntimeError(
                f"{self.replay.block.stock_type.__name__} (recomputed in backward) was reached in backward "
                f"other than through its outputs, so it was not recomputed; a tensor made inside a "
                f"recomputed block can leave it only as its output: prepare with recompute=False for this "
                f"model, or name other blocks"
            )
        if slot.dropped:
            slot.tensor, slot.unpacked = None, True  # its node has it now; stock lets a saved tensor go so
        return t

    def release(self, alive: Sequence[Tensor], inputs: Sequence[Tensor]) -> list[Tensor]:
        """Drop the slots whose storage is not one of ``alive``'s (the block's inputs, outputs, parameters
        and buffers), but for the small ones (1/16 of the inputs' bytes or less: a norm's statistics) the
        block saved after the last large one: keeping them lets the recomputation stop at that one. Returns
        the tensors kept that are not ``alive``'s, for :class:`_Hold` to save."""
        keys = {k for k in (storage_key(t) for t in alive) if k is not None}
        for slot in self.slots:
            assert slot.tensor is not None
            if storage_key(slot.tensor) not in keys:
                slot.dropped = True
        small = sum(t.numel() * t.element_size() for t in inputs) // 16
        kept: list[Tensor] = []
        for slot in reversed(self.slots):
            if not slot.dropped:
                continue
            assert slot.tensor is not None
            if slot.tensor.numel() * slot.tensor.element_size() > small:
                break
            slot.dropped = False
            kept.append(slot.tensor)
        for slot in self.slots:
            if slot.dropped:
                slot.tensor = None
        return kept

    def recompute(self, inputs: Sequence[Tensor]) -> None:
        """Run the block again from ``inputs`` and refill the dropped slots (see the class docstring)."""
        missing = [i for i, slot in enumerate(self.slots) if slot.dropped and slot.tensor is None]
        if not missing:
            return
        last, slots, counter = missing[-1], self.slots, iter(range(len(self.slots) + 1))
        name = self.replay.block.stock_type.__name__

        def pack(t: Tensor) -> None:
            i = next(counter)
            if i >= len(slots) or slots[i].meta != (t.shape, t.dtype, t.device):
                raise RuntimeError(
                    f"{name} saved different tensors when recomputed in backward than in its forward "
                    f"(tensor {i}: {(tuple(t.shape), t.dtype)}), so its forward is not repeatable (it "
                    f"branches on state that changed); prepare with recompute=False or name other blocks"
                )
            if slots[i].dropped and slots[i].tensor is None:
                slots[i].tensor, slots[i].unpacked = t.detach(), False
            if i == last:
                raise _StopRecompute

        def never(_: None) -> Tensor:  # the recomputation's own graph is thrown away, never unpacked
            raise AssertionError("unreachable")

        # as in the forward (saved-tensor hooks, memory.measure's among them, may unpack a detached alias)
        again = [t.detach().requires_grad_(need) for t, need in zip(inputs, self.needs, strict=True)]
        with _norm_stats(self.modules), torch.enable_grad(), _transient(again), self.replay.replayed():
            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, never):
                    self.replay.run(again)
            except _StopRecompute:
                pass


class _Hold(torch.autograd.Function):
    """The block's outputs, passed through; it keeps the block's inputs (and any output a node inside the
    block saved) for backward, where it is reached first and recomputes the block (:meth:`_Call.recompute`).

    It saves through ``save_for_backward``, so ``memory.measure`` and ``memory.estimate`` count exactly
    what a recomputed block keeps."""

    @staticmethod
    def forward(ctx: Any, call: _Call, n_inputs: int, n_saved: int, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.call, ctx.n_inputs = call, n_inputs
        ctx.save_for_backward(*tensors[: n_inputs + n_saved])
        ctx.set_materialize_grads(False)
        return tuple(t.view_as(t) for t in tensors[n_inputs + n_saved :])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        ctx.call.recompute(saved[: ctx.n_inputs])
        return (None, None, None, *(None for _ in saved), *grads)


class RecomputedBlock(nn.Module):
    """A block that keeps only its inputs for backward and recomputes the rest (see the module docstring).

    Made with :meth:`from_module` as a twin of the block's class (same Parameters, buffers, children and
    ``state_dict`` keys); :meth:`to_stock` gives the block back.
    """

    stock_type: ClassVar[type[nn.Module]]

    @classmethod
    def from_module(cls, module: nn.Module) -> RecomputedBlock:
        if isinstance(module, RecomputedBlock):
            return module
        return clone_module_as(module, twin_class(cls, type(module)))

    def to_stock(self) -> nn.Module:
        """The original block (its own class) with this block's config and tensors."""
        return clone_module_as(self, self.stock_type)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        stock_forward = self.stock_type.forward
        if not torch.is_grad_enabled():
            return stock_forward(self, *args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        for leaf in flat:
            if not isinstance(leaf, (Tensor, *_PLAIN)):
                raise RecomputeConflictError(
                    f"{self.stock_type.__name__} recomputes in backward but received a "
                    f"{type(leaf).__name__}, which its forward may change (a key/value cache is "
                    f"updated again when the block is recomputed); train without it (for "
                    f"transformers: model.config.use_cache = False before prepare(..., recompute=...)), "
                    f"or prepare with recompute=False"
                )
        slots = [i for i, leaf in enumerate(flat) if isinstance(leaf, Tensor)]
        tensors = [flat[i] for i in slots]
        modules = list(self.modules())
        own = [t for m in modules for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
        if not any(t.requires_grad for t in (*own, *tensors)):
            return stock_forward(self, *args, **kwargs)  # nothing to differentiate: autograd keeps nothing
        replay = _Replay(self, spec, [None if isinstance(leaf, Tensor) else leaf for leaf in flat], slots)
        replay.capture(tensors)
        call = _Call(replay, tensors, modules)
        with torch.autograd.graph.saved_tensors_hooks(call.pack, call.unpack), _transient(tensors):
            out = stock_forward(self, *args, **kwargs)
        flat_out, out_spec = tree_flatten(out)
        outs = [i for i, leaf in enumerate(flat_out) if isinstance(leaf, Tensor) and leaf.requires_grad]
        if not outs:
            return out  # nothing outside the block can reach its graph
        returned = [leaf for leaf in flat_out if isinstance(leaf, Tensor)]
        also = call.release([*tensors, *returned, *own], tensors)
        saved_keys = {storage_key(slot.tensor) for slot in call.slots if slot.tensor is not None}
        inputs_keys = {storage_key(t) for t in tensors}
        also += [t for t in returned if storage_key(t) in saved_keys - inputs_keys]  # kept by a node inside
        held = _Hold.apply(call, len(tensors), len(also), *tensors, *also, *(flat_out[i] for i in outs))
        for i, t in zip(outs, held, strict=True):
            flat_out[i] = t
        return tree_unflatten(flat_out, out_spec)


def recomputed_blocks(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of the blocks of ``model`` that recompute, in registration order."""
    return tuple(name for name, m in model.named_modules() if isinstance(m, RecomputedBlock))


def check_recompute_choice(choice: object) -> bool | tuple[str, ...]:
    """``choice`` as a :data:`RecomputeChoice` (a bool, or the block names in order without repeats), its
    type checked without a model (so a caller can refuse it before any work)."""
    if isinstance(choice, bool):
        return choice
    if (
        isinstance(choice, str)
        or not isinstance(choice, Sequence)
        or any(not isinstance(n, str) for n in choice)
    ):
        raise ConfigError(
            f"recompute must be True, False or a tuple of block names, got {choice!r}; e.g. "
            f"recompute=True, or recompute=('encoder.layer.0',)"
        )
    return tuple(dict.fromkeys(choice))


def resolve_recompute(model: nn.Module, choice: RecomputeChoice, head: str | None) -> tuple[str, ...]:
    """The block names ``choice`` stands for in ``model`` (validated; see ``prepare``'s ``recompute``)."""
    checked = check_recompute_choice(choice)
    if isinstance(checked, bool):
        return tuple(find_blocks(model, head)) if checked else ()
    names = checked
    found = find_blocks(model, head)
    for name in names:
        try:
            module = model.get_submodule(name) if name else None
        except AttributeError:
            module = None
        if module is None:
            raise ConfigError(
                f"recompute names {name!r}, which is not a submodule of {type(model).__name__}; its blocks "
                f"are {found[:8]}{'...' if len(found) > 8 else ''} (recompute=True takes them all)"
            )
    nested = [(a, b) for a in names for b in names if b.startswith(a + ".")]
    if nested:
        outer, inner = nested[0]
        raise ConfigError(
            f"recompute names {outer!r} and {inner!r}, which lies inside it; a block is recomputed whole, "
            f"so name only {outer!r} (or only the inner blocks)"
        )
    return names


def apply_recompute(
    model: nn.Module, choice: RecomputeChoice, *, head: str | None = None, example: ExampleSpec | None = None
) -> tuple[str, ...]:
    """Make the blocks ``choice`` names :class:`RecomputedBlock`\\ s, replacing them through their parents.

    ``recompute=True`` on a model without blocks warns and changes nothing. With ``example``, the model runs
    once on a fake batch so that a block called with something its recomputation would change again (a
    key/value cache) is refused now rather than at the first step.

    Raises:
        ConfigError: a bad choice, or a block receives state it would update twice (the message says how
            to train without it).
    """
    names = resolve_recompute(model, choice, head)
    if choice is True and not names:
        warnings.warn(
            f"recompute=True: {type(model).__name__} has no blocks to recompute (no registered blocks, no "
            f"repeated layers in a ModuleList/Sequential, no residual blocks), so nothing changes; name "
            f"the blocks with recompute=('qualified.name', ...)",
            UserWarning,
            stacklevel=3,
        )
        return ()
    for name in names:
        replace_submodule(model, name, RecomputedBlock.from_module(model.get_submodule(name)))
    if names and example is not None:
        _check_calls(model, example)
    return names


def _check_calls(model: nn.Module, example: ExampleSpec) -> None:
    """Run ``model`` once on fake tensors with gradients on: the blocks refuse state they would change."""
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()  # norm statistics stay as they are
        with FakeTensorMode(allow_non_fake_inputs=True), torch.enable_grad():
            model(example.empty(device=device))
    except RecomputeConflictError:
        raise
    except Exception as error:  # the model's own forward may not take this batch; the step will tell
        logger.info("could not run %s on %s to check its blocks: %s", type(model).__name__,
                    example.describe(), error)  # fmt: skip
    finally:
        for module, training in modes.items():
            module.training = training
