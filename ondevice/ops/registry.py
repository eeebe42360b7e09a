"""The registry of memory-saving ops and the base class of memory-saving layers.

Each op family (``conv.py``, ``linear.py``, ...) subclasses a layer, so a converted layer keeps the
parameter and buffer names (``state_dict`` keys) and the very Parameter objects of the layer it replaces,
and registers a factory for that layer here, keyed either by the layer's type (torch layers) or by its
qualified import path (``"timm.layers.norm_act.BatchNormAct2d"``), so that ``import ondevice`` never
imports timm or transformers.

Lookup understands subclasses (:func:`op_support`): it walks the layer type's MRO to the first class with
an op. A subclass between the two that defines ``forward`` (or another method the op relies on, e.g. a
convolution's ``_conv_forward``) may compute something else, so the op does not apply: the layer runs on
stock autograd and is reported, never swapped silently. A subclass that keeps its parent's ``forward``
gets the parent's op through a *twin class* built for it, ``type("MemorySaving<Sub>", (Twin, Sub), ...)``
(:func:`twin_class`): the converted layer is still an instance of the user's class, keeps its other
methods, and :meth:`MemorySavingModule.to_stock` gives back an instance of that class.

An op for a third-party layer with its own ``forward`` mirrors that ``forward``, so its registration
records a fingerprint of the library source it was written against (:func:`source_fingerprint`). When the
installed library's source differs, the op does not apply (one warning names the layer) and the layer runs
stock until the op is updated: a library upgrade can cost memory, never change what a layer computes.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import logging
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self, TypeVar, get_args

from torch import nn

from ondevice.errors import ConfigError, UnknownNameError

__all__ = [
    "COMPRESS_MODES",
    "CompressMode",
    "MaskMode",
    "MemorySavingModule",
    "OpFactory",
    "OpOptions",
    "OpSupport",
    "clone_module_as",
    "find_op",
    "library_layers",
    "op_support",
    "qualified_name",
    "register_op",
    "source_fingerprint",
    "supported_types",
    "twin_class",
]

logger = logging.getLogger(__name__)

MaskMode = Literal["bit", "byte"]
CompressMode = Literal["int8", "2bit"]
#: What ``compress=`` takes besides ``None``, everywhere it is taken (``prepare``, transfer, plan, the CLI).
COMPRESS_MODES: tuple[str, ...] = get_args(CompressMode)


@dataclass(frozen=True)
class OpOptions:
    """How memory-saving ops store what they keep for backward.

    Attributes:
        mask: ``"bit"`` packs ReLU-family and dropout masks 8 elements per byte (TinyTL's 1-bit ReLU
            activation, Cai et al. 2020, Sec. 3); ``"byte"`` keeps one byte per element, a little faster.
        compress: ``None`` keeps the inputs of smooth activations (SiLU, GELU, Hardswish, Sigmoid, Tanh) at
            full precision, so gradients equal stock PyTorch's exactly; ``"int8"`` keeps them as 8 bits with
            a per-group offset and scale (lossy, bounded gradient error; for networks without ReLUs);
            ``"2bit"`` keeps 2 bits per element, which of four intervals the input fell in, and backward
            uses a 4-level step derivative (ReGELU2/ReSiLU2; forward unchanged, gradient approximate; see
            ``ondevice.ops._compress``). Activations without a 2-bit derivative (Mish, QuickGELU, ...)
            keep 8 bits under ``"2bit"``. Under either lossy mode attention keeps q, k and v in float16
            where they fit its range (``ondevice.ops.sdpa``).
    """

    mask: MaskMode = "bit"
    compress: CompressMode | None = None

    def __post_init__(self) -> None:
        if self.mask not in get_args(MaskMode):
            raise ConfigError(f"mask must be one of 'bit', 'byte', got {self.mask!r}")
        if self.compress is not None and self.compress not in COMPRESS_MODES:
            raise ConfigError(f"compress must be None or 'int8' or '2bit', got {self.compress!r}")


_M = TypeVar("_M", bound=nn.Module)
OpFactory = Callable[[nn.Module, OpOptions], nn.Module]


@dataclass(frozen=True)
class _Entry:
    factory: OpFactory
    relies_on: tuple[str, ...]
    fingerprint: str | None  # of the library source the op mirrors (library layers only)
    also: tuple[str, ...]  # qualified names of library functions the op mirrors too
    written_for: str


_REGISTRY: dict[type[nn.Module], _Entry] = {}
_BY_NAME: dict[str, _Entry] = {}
_TWINS: dict[tuple[type, type], type] = {}
_FINGERPRINTS: dict[tuple[type, tuple[str, ...], tuple[str, ...]], str] = {}
_WARNED: set[type] = set()


def qualified_name(cls: type) -> str:
    """``module.QualName`` of ``cls``, the key library layers are registered under."""
    return f"{cls.__module__}.{cls.__qualname__}"


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


def _new_twin(twin: type[nn.Module], layer_type: type[nn.Module]) -> nn.Module:
    cls = twin_class(twin, layer_type)
    return cls.__new__(cls)


def _reduce_twin(self: nn.Module, protocol: object) -> tuple[Any, ...]:
    """Pickle (and deepcopy) support for made classes: rebuilt from the two importable classes."""
    twin, layer_type = type(self).__bases__
    return _new_twin, (twin, layer_type), self.__getstate__()


def twin_class(twin: type[_M], layer_type: type[nn.Module]) -> type[_M]:
    """The memory-saving class for ``layer_type``: ``twin`` itself, or ``twin`` mixed into ``layer_type``.

    ``twin`` is a memory-saving class written for ``layer_type`` or one of its bases (or a mixin written
    for a library layer). For any other ``layer_type`` the result is a class (made once and cached)
    ``MemorySaving<Name>(twin, layer_type)`` whose ``stock_type`` is ``layer_type``: its instances are
    instances of ``layer_type`` with its other methods, and ``twin``'s ``forward``; they pickle (the
    two classes are pickled by reference and the class is made again on loading).
    """
    if getattr(twin, "stock_type", None) is layer_type:
        return twin
    key = (twin, layer_type)
    made = _TWINS.get(key)
    if made is None:
        name = f"MemorySaving{layer_type.__name__}"
        namespace = {
            "stock_type": layer_type,
            "__reduce_ex__": _reduce_twin,
            "__module__": twin.__module__,
            "__qualname__": name,
            "__doc__": f"``{qualified_name(layer_type)}`` with the memory-saving forward of {twin.__name__}.",
        }
        made = _TWINS[key] = type(name, (twin, layer_type), namespace)
    return made  # type: ignore[return-value]


def _owner_before(layer_type: type, anchor: type, relies_on: tuple[str, ...]) -> str | None:
    """``Class.method`` of the first class between ``layer_type`` and ``anchor`` overriding ``relies_on``."""
    for cls in layer_type.__mro__:
        if cls is anchor:
            return None
        for method in relies_on:
            if method in cls.__dict__:
                return f"{cls.__name__}.{method}"
    return None


class MemorySavingModule(nn.Module):
    """Base of every memory-saving layer: a subclass of a layer whose forward uses custom ops.

    Subclasses for torch layers list the base as ``class MemorySavingConv2d(MemorySavingModule,
    nn.Conv2d)`` and set ``stock_type``. Ops for library layers are mixins that set ``library_layer`` (the
    qualified name of the layer they mirror); :func:`twin_class` mixes them into the layer's class.
    Instances are made with :meth:`from_module` (never ``__init__``) and turned back with :meth:`to_stock`.
    """

    stock_type: ClassVar[type[nn.Module]]
    library_layer: ClassVar[str] = ""  # qualified name of the library layer a mixin is written for
    relies_on: ClassVar[tuple[str, ...]] = ("forward",)  # methods of the layer the op mirrors
    converts_children: ClassVar[bool] = True  # whether ``convert`` converts this layer's children
    shown_options: ClassVar[tuple[str, ...]] = ()  # the OpOptions fields this layer uses, for its repr
    op_options: OpOptions

    @classmethod
    def _anchor(cls, layer_type: type) -> type | None:
        for base in layer_type.__mro__:
            if base is getattr(cls, "stock_type", None) or qualified_name(base) == cls.library_layer:
                return base
        return None

    @classmethod
    def from_module(cls, module: nn.Module, options: OpOptions) -> Self:
        """The memory-saving twin of ``module`` (same config, same Parameter and buffer objects).

        ``module`` may be an instance of a subclass of the layer this op is written for, as long as no
        class in between overrides ``forward`` (or another method the op mirrors).

        Raises:
            ConfigError: ``module`` is not such a layer.
        """
        layer_type = type(module)
        written_for = cls.library_layer or cls.stock_type.__name__
        anchor = cls._anchor(layer_type)
        if anchor is None or isinstance(module, MemorySavingModule):
            raise ConfigError(
                f"{cls.__name__} replaces {written_for}, got {layer_type.__name__}; "
                f"use ondevice.ops.convert to pick the right op for each layer"
            )
        owner = _owner_before(layer_type, anchor, cls.relies_on)
        if owner is not None:
            raise ConfigError(
                f"{layer_type.__name__} overrides {owner}, so {cls.__name__} (written for {written_for}) "
                f"could compute something else; register an op for {layer_type.__name__} or leave it stock"
            )
        new = clone_module_as(module, twin_class(cls, layer_type))
        new.op_options = options
        return new

    def to_stock(self) -> nn.Module:
        """The original layer (same class as before conversion) with this layer's config and tensors."""
        stock = clone_module_as(self, self.stock_type)
        stock.__dict__.pop("op_options", None)
        stock.__dict__.pop("share_output", None)  # set on some LayerNorm ops (ondevice.ops.norm)
        return stock

    def extra_repr(self) -> str:
        base = super().extra_repr()
        options = ", ".join(f"{name}={getattr(self.op_options, name)}" for name in self.shown_options)
        return ", ".join(part for part in (base, options) if part)


def _normalised_source(obj: Any) -> str:
    """``obj``'s source as an AST dump without docstrings: comments and formatting do not count."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def _resolve(path: str) -> Any:
    """The object named by a dotted ``module.attr[.attr]`` path (imports the module if needed)."""
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        module = sys.modules.get(module_name)
        if module is None:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
        obj: Any = module
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"cannot import {path}")


def source_fingerprint(
    layer_type: type, relies_on: tuple[str, ...] = ("forward",), also: tuple[str, ...] = ()
) -> str:
    """sha256 (first 16 hex digits) of the normalised source of ``layer_type``'s ``relies_on`` methods.

    ``also`` names further functions (``"timm.layers.padding.pad_same"``) whose source counts too. The
    methods are looked up on ``layer_type`` itself (what its instances run).
    """
    key = (layer_type, relies_on, also)
    cached = _FINGERPRINTS.get(key)
    if cached is None:
        digest = hashlib.sha256()
        for method in relies_on:
            digest.update(_normalised_source(getattr(layer_type, method)).encode())
        for path in also:
            digest.update(_normalised_source(_resolve(path)).encode())
        cached = _FINGERPRINTS[key] = digest.hexdigest()[:16]
    return cached


def register_op(
    layer: type[nn.Module] | str,
    factory: OpFactory,
    *,
    replace: bool = False,
    relies_on: tuple[str, ...] = ("forward",),
    fingerprint: str | None = None,
    also: tuple[str, ...] = (),
    written_for: str = "",
) -> None:
    """Register ``factory(module, options) -> nn.Module`` as the memory-saving op for ``layer``.

    Args:
        layer: a module type, or the qualified name (``module.QualName``) of a library layer, so that the
            library is not imported to register it; the op then applies only while the installed
            library's source of ``relies_on`` (and ``also``) has the given ``fingerprint``.
        factory: builds the converted layer; it receives instances of ``layer`` and of subclasses that
            override none of ``relies_on``.
        replace: override an existing registration.
        relies_on: the methods of ``layer`` whose behaviour the op reproduces.
        fingerprint: :func:`source_fingerprint` of the library source the op mirrors (names only).
        also: qualified names of library functions the op mirrors as well (names only).
        written_for: the library version the op was written against, for messages (names only).

    Raises:
        ConfigError: ``layer`` already has an op and ``replace`` is false, it is not a Module type or a
            dotted name, or a name comes without a fingerprint.
    """
    entry = _Entry(factory, tuple(relies_on), fingerprint, tuple(also), written_for)
    if isinstance(layer, str):
        if "." not in layer or fingerprint is None:
            raise ConfigError(
                f"a library layer is registered by its qualified name ('package.module.Class') with the "
                f"fingerprint of the source its op mirrors; got {layer!r}, fingerprint={fingerprint!r}"
            )
        registry: dict[Any, _Entry] = _BY_NAME
        name = layer
    elif isinstance(layer, type) and issubclass(layer, nn.Module):
        registry, name = _REGISTRY, layer.__qualname__
    else:
        raise ConfigError(f"register_op needs an nn.Module subclass or a qualified name, got {layer!r}")
    if layer in registry and not replace:
        raise ConfigError(
            f"a memory-saving op for {name} is already registered "
            f"({registry[layer].factory!r}); pass replace=True to override it"
        )
    registry[layer] = entry
    logger.debug("registered memory-saving op for %s", name)


@dataclass(frozen=True)
class OpSupport:
    """Whether a layer type has a memory-saving op, and why (not).

    Attributes:
        layer: the layer type's qualified name.
        supported: ``convert`` replaces such layers.
        op_for: the qualified name of the class whose op applies (the layer's own or an ancestor's).
        reason: one line for people: which op applies, or why none does.
        children_converted: ``convert`` converts the layer's children too (false where the op owns them,
            as the partial-channel op owns its frozen base layer).
    """

    layer: str
    supported: bool
    op_for: str | None
    reason: str
    children_converted: bool = True


def _lookup(layer_type: type) -> tuple[OpSupport, _Entry | None]:
    name = qualified_name(layer_type)
    if issubclass(layer_type, MemorySavingModule):
        return OpSupport(name, True, name, "already converted", layer_type.converts_children), None
    for cls in layer_type.__mro__:
        entry = _REGISTRY.get(cls) if cls in _REGISTRY else _BY_NAME.get(qualified_name(cls))
        if entry is None:
            continue
        cls_name = qualified_name(cls)
        owner = _owner_before(layer_type, cls, entry.relies_on)
        if owner is not None:
            reason = f"own {owner} (a subclass of {cls.__qualname__}), no registered op: runs stock"
            return OpSupport(name, False, None, reason), None
        if entry.fingerprint is not None:
            try:
                installed = source_fingerprint(cls, entry.relies_on, entry.also)
            except (OSError, TypeError, ImportError, AttributeError, SyntaxError):
                installed = None
            if installed != entry.fingerprint:
                written = f" ({entry.written_for})" if entry.written_for else ""
                reason = (
                    f"the installed {cls_name} differs from the version its op was written for{written}: "
                    f"runs stock until ondevice's op is updated"
                )
                if cls not in _WARNED:
                    _WARNED.add(cls)
                    logger.warning("%s", reason)
                return OpSupport(name, False, None, reason), None
        how = "its own op" if cls is layer_type else f"the op of {cls.__qualname__} (same forward)"
        twin = getattr(entry.factory, "__self__", None)  # a MemorySavingModule's from_module, usually
        children = isinstance(twin, type) and issubclass(twin, MemorySavingModule) and twin.converts_children
        return OpSupport(name, True, cls_name, how, children), entry
    return OpSupport(name, False, None, "no registered op for it or its base classes: runs stock"), None


def op_support(layer: nn.Module | type[nn.Module]) -> OpSupport:
    """Whether ``layer`` (a module or a module type) has a memory-saving op, and which, or why not."""
    return _lookup(layer if isinstance(layer, type) else type(layer))[0]


def find_op(module_type: type[nn.Module]) -> OpFactory:
    """The factory of the op that applies to ``module_type`` (its own or a base class's; see the module doc).

    Raises:
        UnknownNameError: no op applies; the message lists the registered layers.
    """
    _, entry = _lookup(module_type)
    if entry is None:
        name = getattr(module_type, "__qualname__", repr(module_type))
        choices = [*(t.__qualname__ for t in _REGISTRY), *_BY_NAME]
        raise UnknownNameError("layer type", name, choices) from None
    return entry.factory


def supported_types() -> tuple[type[nn.Module], ...]:
    """Module types registered by type (torch layers), sorted by name; see also :func:`library_layers`."""
    return tuple(sorted(_REGISTRY, key=lambda t: t.__qualname__))


def library_layers() -> tuple[str, ...]:
    """Qualified names of the library layers with an op (registered by name), sorted."""
    return tuple(sorted(_BY_NAME))
