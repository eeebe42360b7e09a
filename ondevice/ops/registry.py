"""The registry of memory-saving ops, keyed by module type, and the base class of memory-saving layers.

Each op family (``conv.py``, ``linear.py``, ...) subclasses a torch layer, so a converted layer keeps the
parameter and buffer names (``state_dict`` keys) and the very Parameter objects of the layer it replaces,
and registers a factory for the stock type here. Lookup is by *exact* type: a user subclass of
``nn.Conv2d`` may override ``forward``, so it is never replaced silently (it shows up in
:func:`ondevice.ops.unsupported_leaves` instead); register an op for it to opt in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, Self, TypeVar, get_args

from torch import nn

from ondevice.errors import ConfigError, UnknownNameError

__all__ = [
    "MaskMode",
    "MemorySavingModule",
    "OpFactory",
    "OpOptions",
    "clone_module_as",
    "find_op",
    "register_op",
    "supported_types",
]

logger = logging.getLogger(__name__)

MaskMode = Literal["bit", "byte"]
CompressMode = Literal["int8"]


@dataclass(frozen=True)
class OpOptions:
    """How memory-saving ops store what they keep for backward.

    Attributes:
        mask: ``"bit"`` packs ReLU-family and dropout masks 8 elements per byte (TinyTL's 1-bit ReLU
            activation, Cai et al. 2020, Sec. 3); ``"byte"`` keeps one byte per element, a little faster.
        compress: ``None`` keeps the inputs of smooth activations (SiLU, GELU, Hardswish, Sigmoid, Tanh) at
            full precision, so gradients equal stock PyTorch's exactly; ``"int8"`` keeps them as 8 bits with
            a per-group offset and scale (lossy, bounded gradient error; for networks without ReLUs).
    """

    mask: MaskMode = "bit"
    compress: CompressMode | None = None

    def __post_init__(self) -> None:
        if self.mask not in get_args(MaskMode):
            raise ConfigError(f"mask must be one of 'bit', 'byte', got {self.mask!r}")
        if self.compress is not None and self.compress not in get_args(CompressMode):
            raise ConfigError(f"compress must be None or 'int8', got {self.compress!r}")


_M = TypeVar("_M", bound=nn.Module)
OpFactory = Callable[[nn.Module, OpOptions], nn.Module]
_REGISTRY: dict[type[nn.Module], OpFactory] = {}


def clone_module_as(module: nn.Module, cls: type[_M]) -> _M:
    """A new ``cls`` instance with ``module``'s configuration, sharing its Parameters, buffers and children.

    The parameter/buffer/child dictionaries are copied (so the two modules can diverge later) but their
    entries are the same objects. Hook dictionaries are shared, so handles a user holds keep working.
    ``module`` itself is not modified.
    """
    new = cls.__new__(cls)
    for key, value in module.__dict__.items():
        if key in ("_parameters", "_buffers", "_modules"):
            value = type(value)(value)
        elif key == "_non_persistent_buffers_set":
            value = set(value)
        new.__dict__[key] = value
    return new


class MemorySavingModule(nn.Module):
    """Base of every memory-saving layer: a subclass of a stock torch layer whose forward uses custom ops.

    Subclasses list the base as ``class MemorySavingConv2d(MemorySavingModule, nn.Conv2d)`` and set
    ``stock_type``. Instances are made with :meth:`from_module` (never ``__init__``) and turned back with
    :meth:`to_stock`.
    """

    stock_type: ClassVar[type[nn.Module]]
    shown_options: ClassVar[tuple[str, ...]] = ()  # the OpOptions fields this layer uses, for its repr
    op_options: OpOptions

    @classmethod
    def from_module(cls, module: nn.Module, options: OpOptions) -> Self:
        """The memory-saving twin of ``module`` (same config, same Parameter and buffer objects)."""
        if type(module) is not cls.stock_type:
            raise ConfigError(
                f"{cls.__name__} replaces {cls.stock_type.__name__}, got {type(module).__name__}; "
                f"use ondevice.ops.convert to pick the right op for each layer"
            )
        new = clone_module_as(module, cls)
        new.op_options = options
        return new

    def to_stock(self) -> nn.Module:
        """The stock torch layer with this layer's config, Parameters and buffers."""
        stock = clone_module_as(self, self.stock_type)
        stock.__dict__.pop("op_options", None)
        return stock

    def extra_repr(self) -> str:
        base = super().extra_repr()
        options = ", ".join(f"{name}={getattr(self.op_options, name)}" for name in self.shown_options)
        return ", ".join(part for part in (base, options) if part)


def register_op(module_type: type[nn.Module], factory: OpFactory, *, replace: bool = False) -> None:
    """Register ``factory(module, options) -> nn.Module`` as the memory-saving op for ``module_type``.

    Raises:
        ConfigError: ``module_type`` already has an op and ``replace`` is false, or it is not a Module type.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ConfigError(f"register_op needs an nn.Module subclass, got {module_type!r}")
    if module_type in _REGISTRY and not replace:
        raise ConfigError(
            f"a memory-saving op for {module_type.__qualname__} is already registered "
            f"({_REGISTRY[module_type]!r}); pass replace=True to override it"
        )
    _REGISTRY[module_type] = factory
    logger.debug("registered memory-saving op for %s", module_type.__qualname__)


def find_op(module_type: type[nn.Module]) -> OpFactory:
    """The factory registered for exactly ``module_type``.

    Raises:
        UnknownNameError: nothing is registered for it; the message lists the registered types.
    """
    try:
        return _REGISTRY[module_type]
    except KeyError:
        name = getattr(module_type, "__qualname__", repr(module_type))
        raise UnknownNameError("layer type", name, (t.__qualname__ for t in _REGISTRY)) from None


def supported_types() -> tuple[type[nn.Module], ...]:
    """Module types that have a memory-saving op, sorted by name."""
    return tuple(sorted(_REGISTRY, key=lambda t: t.__qualname__))
