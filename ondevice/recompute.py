"""Exact recomputation, block by block: keep a block's inputs, recompute the rest in backward.

``prepare(..., recompute=True)`` (or a tuple of block names) turns each chosen block into a
:class:`RecomputedBlock`: a twin of the block's own class (as :func:`ondevice.ops.twin_class` makes them
for layers), so the block keeps its name, its parameters, its other methods and its ``state_dict`` keys.
Its forward runs the block's own ``forward`` inside :class:`_Recompute`, an autograd Function that runs it
without building a graph, saves only the block's tensor arguments (through ``save_for_backward``, so
``memory.measure`` and ``memory.estimate`` see exactly what is kept) and the random-number state, and in
backward runs the block again from those inputs under the same random state and differentiates it. The
gradients are those of the block run once (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
Cost", Sec. 3; ``torch.utils.checkpoint`` does the same, but keeps its inputs where saved-tensor hooks
cannot count them). The price is one more forward of each recomputed block per step.

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
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ondevice._example import ExampleSpec
from ondevice.errors import ConfigError
from ondevice.models.blocks import block_types
from ondevice.ops.registry import clone_module_as, twin_class
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
        self.out_spec: TreeSpec | None = None
        self.out_leaves: list[Any] = []
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
def _norm_stats(block: nn.Module) -> Iterator[None]:
    """Put back the running statistics a recomputation in training mode updates a second time."""
    norms = [
        m
        for m in block.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
    ]
    kept = [{k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in zip(norms, kept, strict=True):
                for key, value in buffers.items():
                    getattr(module, key).copy_(value)


class _Recompute(torch.autograd.Function):
    """Run a block without a graph, keep its tensor inputs, recompute and differentiate it in backward."""

    @staticmethod
    def forward(ctx: Any, replay: _Replay, n_inputs: int, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        inputs = tensors[:n_inputs]
        replay.capture(inputs)
        out = replay.run(inputs)
        flat, replay.out_spec = tree_flatten(out)
        replay.out_leaves = [None if isinstance(leaf, Tensor) else leaf for leaf in flat]
        outs = tuple(leaf for leaf in flat if isinstance(leaf, Tensor))
        ctx.replay = replay
        ctx.n_inputs = n_inputs
        ctx.params = tensors[n_inputs:]
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(o for o in outs if not o.is_floating_point()))
        return outs

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        replay: _Replay = ctx.replay
        needs = ctx.needs_input_grad[2:]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs, strict=False)]
        wrt = [t for t, need in zip([*inputs, *ctx.params], needs, strict=True) if need]
        found: Sequence[Tensor | None] = [None] * len(wrt)
        with _norm_stats(replay.block), torch.enable_grad():  # statistics go back once the graph is used
            with replay.replayed():
                out = replay.run(inputs)
            outs = [leaf for leaf in tree_flatten(out)[0] if isinstance(leaf, Tensor)]
            pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None and o.requires_grad]
            if pairs and wrt:
                found = torch.autograd.grad(
                    [o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True
                )
            del out, outs, pairs
        it = iter(found)
        return (None, None, *(next(it) if need else None for need in needs))


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
        params = [p for p in self.parameters() if p.requires_grad]
        if not params and not any(t.requires_grad for t in tensors):
            return stock_forward(self, *args, **kwargs)  # nothing to differentiate: autograd keeps nothing
        replay = _Replay(self, spec, [None if isinstance(leaf, Tensor) else leaf for leaf in flat], slots)
        outs = _Recompute.apply(replay, len(tensors), *tensors, *params)
        it = iter(outs)
        flat_out = [next(it) if leaf is None else leaf for leaf in replay.out_leaves]
        return tree_unflatten(flat_out, cast(TreeSpec, replay.out_spec))


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
