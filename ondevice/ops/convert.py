"""Swap stock layers for memory-saving ones (and back), replacing children through their parents.

``convert`` walks containers (``Sequential``, ``ModuleList``, ``ModuleDict`` and any user module with
children) and replaces every child whose type has a registered op by its memory-saving twin, which keeps
the same parameter and buffer names and the same Parameter objects, so ``state_dict`` keys, optimizers
and checkpoints are unaffected. Nothing is patched and nothing is stored on user modules.

Judgment call on what counts as unsupported: a module holding parameters of its own whose type has no op
runs on stock autograd with its own saving rules, which ``unsupported_leaves`` reports (``prepare()``
lists them). Parameter-free layers without an op (Flatten, Identity, Upsample, Softmax, a user's
activation, ...) are left alone and not reported by default: they either keep nothing for backward
(:data:`SAVES_NOTHING`) or keep what stock keeps, which ``memory.measure`` shows per module; pass
``include_parameterless=True`` to list those that may keep something.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

from torch import nn

from ondevice.ops.registry import (
    CompressMode,
    MemorySavingModule,
    OpOptions,
    clone_module_as,
    find_op,
    op_support,
    twin_class,
)
from ondevice.ops.sdpa import MemorySavingAttention, attention_callers
from ondevice.ops.sequential import MemorySavingSequential, fusable_runs, inplace_pairs, sequential_applies

__all__ = ["SAVES_NOTHING", "convert", "restore", "unsupported_leaves"]

logger = logging.getLogger(__name__)

SAVES_NOTHING: tuple[type[nn.Module], ...] = (
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Upsample,
    nn.UpsamplingBilinear2d,
    nn.UpsamplingNearest2d,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
)
"""Parameter-free layers that keep no tensor for backward under stock autograd (only shapes)."""


def _swap(module: nn.Module, options: OpOptions) -> nn.Module | None:
    """The memory-saving replacement of ``module``, or ``None`` when no op applies to its type."""
    stock = module.to_stock() if isinstance(module, MemorySavingModule) else module
    if not op_support(stock).supported:
        return None
    return find_op(type(stock))(stock, options)


def _convert_children(parent: nn.Module, options: OpOptions, done: dict[int, nn.Module]) -> int:
    """Replace the children of ``parent`` (and theirs), each shared module once; return how many."""
    replaced = 0
    for name, child in list(parent.named_children()):
        if id(child) in done:  # a module shared by several parents: one replacement for all
            if done[id(child)] is not child:
                setattr(parent, name, done[id(child)])
            continue
        new = _swap(child, options)
        done[id(child)] = child if new is None else new
        if new is not None:
            setattr(parent, name, new)
            replaced += 1
        current = child if new is None else new
        if not (isinstance(current, MemorySavingModule) and not current.converts_children):
            replaced += _convert_children(current, options, done)
    return replaced


def convert(
    module: nn.Module,
    *,
    mask: Literal["bit", "byte"] = "bit",
    compress: CompressMode | None = None,
) -> nn.Module:
    """Replace every supported layer of ``module`` by a memory-saving equivalent; return the result.

    Children are replaced in place through their parents; the returned module is ``module`` itself unless
    ``module`` is a supported layer (then its replacement is returned). A layer is supported when its type
    or a base class it inherits ``forward`` from has an op (see :func:`ondevice.ops.op_support`); the
    converted layer is still an instance of its original class. Layers converted earlier are converted
    again with the new options. ``nn.Sequential`` children (and subclasses that keep Sequential's
    ``forward``, e.g. torchvision's ``Conv2dNormActivation``) in which a ReLU-family activation follows a
    convolution, linear layer or norm, or a BatchNorm follows a convolution, become
    :class:`MemorySavingSequential`, which runs frozen conv-BatchNorm(-ReLU) runs as one op and
    activations in place. Gradients are unchanged (exactly, for the lossless default).

    Args:
        module: a model or a single layer.
        mask: ``"bit"`` (1 bit per element) or ``"byte"`` masks for ReLU-family and dropout layers.
        compress: ``None``, ``"int8"`` or ``"2bit"`` for what smooth activations keep (see ``OpOptions``).

    Raises:
        ConfigError: ``mask`` or ``compress`` is not one of the allowed values.
    """
    options = OpOptions(mask=mask, compress=compress)
    root = _swap(module, options)
    done: dict[int, nn.Module] = {id(module): module if root is None else root}
    if root is not None:
        module = root
        if not module.converts_children:  # type: ignore[attr-defined]
            return module
    replaced = _convert_children(module, options, done) + (root is not None)
    # Inner Sequentials before outer ones, so an outer one's (copied) child dict holds the replaced inner.
    for parent in reversed(list(module.modules())):
        for name, child in list(parent.named_children()):
            if sequential_applies(child) and (inplace_pairs(child) or fusable_runs(child)):
                setattr(parent, name, clone_module_as(child, twin_class(MemorySavingSequential, type(child))))
    for name in attention_callers(module):  # their SDPA keeps q, k, v only (ondevice.ops.sdpa)
        parent_name, _, child_name = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        attention = getattr(parent, child_name)
        lean = clone_module_as(attention, twin_class(MemorySavingAttention, type(attention)))
        if options.compress is not None:  # a lossy mode: q, k and v in float16 too
            lean.half_attention = True
        setattr(parent, child_name, lean)
    logger.debug("converted %d layer(s) to memory-saving ops (%s)", replaced, options)
    return module


def restore(module: nn.Module) -> nn.Module:
    """Turn every memory-saving layer and Sequential back into its original one (same Parameters)."""
    # Children before parents, so a replaced parent's (copied) child dict holds the restored layers.
    for parent in reversed(list(module.modules())):
        for name, child in list(parent.named_children()):
            if isinstance(child, MemorySavingModule | MemorySavingSequential | MemorySavingAttention):
                setattr(parent, name, child.to_stock())
    if isinstance(module, MemorySavingModule | MemorySavingSequential):
        return module.to_stock()
    return module


def unsupported_leaves(model: nn.Module, *, include_parameterless: bool = False) -> dict[str, str]:
    """Modules that hold parameters of their own but have no memory-saving op: qualified name -> type name.

    Modules with an op (converted or not) are skipped, and so is everything inside those whose op owns
    its children (see :attr:`OpSupport.children_converted`). With
    ``include_parameterless``, parameter-free leaves without an op that may keep tensors for backward
    (i.e. not in :data:`SAVES_NOTHING`) are listed too.
    """
    found: dict[str, str] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in skip):
            continue
        support = op_support(module)
        if support.supported:
            if not support.children_converted:
                skip.append(name)
            continue
        has_own_params = any(True for _ in module.parameters(recurse=False))
        is_leaf = not any(True for _ in module.children())
        if has_own_params or (
            include_parameterless
            and is_leaf
            and not isinstance(module, SAVES_NOTHING)
            and type(module) not in (nn.Sequential, nn.ModuleList, nn.ModuleDict)
        ):
            found[name] = type(module).__name__
    return found


def compressible_layers(module: nn.Module) -> tuple[str, ...]:
    """Qualified names of the layers whose kept tensors ``compress=`` changes (the smooth activations).

    ReLU-family layers keep exact 1-bit masks and frozen layers keep nothing, so ``compress`` does not
    touch them; a layer counts when its op (converted or not) shows the ``compress`` option.
    """
    names = []
    for name, child in module.named_modules():
        if isinstance(child, MemorySavingModule):
            twin: object = type(child)
        elif op_support(child).supported:
            twin = getattr(find_op(type(child)), "__self__", None)
        else:
            continue
        if "compress" in getattr(twin, "shown_options", ()):
            names.append(name)
    return tuple(names)


def effective_compress(module: nn.Module, compress: CompressMode | None) -> CompressMode | None:
    """``compress`` if it changes anything in ``module``, else ``None`` with a warning that says so.

    For ``prepare``: a mode that cannot apply (``"2bit"`` on a ReLU network) says so and changes nothing.
    """
    if compress is None or compressible_layers(module):
        return compress
    message = (
        f"compress={compress!r} changes what smooth activations (GELU, SiLU, Hardswish, Sigmoid, Tanh) keep "
        f"for backward, and this {type(module).__name__} has none (ReLU-family activations keep exact "
        f"1-bit masks already): nothing is compressed; leave compress=None for this model"
    )
    warnings.warn(message, UserWarning, stacklevel=2)
    logger.warning("%s", message)
    return None
