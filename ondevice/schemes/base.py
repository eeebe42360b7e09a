"""What every update scheme shares: the ``Scheme`` base, the registries of schemes and of how each is
applied, and the helpers applicators use to mark what trains.

A scheme is data: a frozen, JSON-serialisable, versioned dataclass, registered by name with
:func:`register_scheme`. How it changes a model is a function registered for its class with
:func:`register_applier`; ``ondevice.prepare`` calls :func:`apply_scheme` on a copy whose parameters are
all frozen.

"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ondevice._example import ExampleSpec
from ondevice._jsonable import fields_to_dict
from ondevice.errors import ConfigError, UnknownNameError, UnknownSchemeError

__all__ = [
    "SCHEME_VERSION",
    "ApplyContext",
    "Scheme",
    "apply_scheme",
    "check_bool",
    "check_names",
    "list_schemes",
    "register_applier",
    "register_scheme",
    "resolve_scheme",
    "train",
    "train_all_biases",
    "train_head",
]

SCHEME_VERSION = 1
"""Bumped when a scheme's fields or meaning change; checkpoints record it."""

_REGISTRY: dict[str, type[Scheme]] = {}


def register_scheme(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator adding a scheme type to the registry under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"scheme class {cls.__name__} needs a non-empty class attribute 'name'")
    if name in _REGISTRY:
        raise ConfigError(f"a scheme named {name!r} is already registered ({_REGISTRY[name].__name__})")
    _REGISTRY[name] = cls
    return cls


def list_schemes() -> list[str]:
    """Names of the registered schemes, sorted."""
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class Scheme:
    """Base class of update schemes.

    Attributes:
        update_norm_stats: whether the running statistics of the model's BatchNorm layers keep updating
            while training. Off for every scheme but ``full``: a device sees small, skewed batches, and
            TinyTL / tiny-training keep the pretrained statistics.
    """

    name: ClassVar[str] = ""
    update_norm_stats: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.update_norm_stats, bool):
            raise ConfigError(
                f"{type(self).__name__}.update_norm_stats must be a bool, got {self.update_norm_stats!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"name": ..., "version": ..., **fields}`` (tuples become lists)."""
        return {"name": self.name, "version": SCHEME_VERSION, **fields_to_dict(self)}

    def to_json(self) -> str:
        """``to_dict`` as a compact, key-sorted JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_dict(payload: Mapping[str, Any]) -> Scheme:
        """Rebuild a scheme from ``to_dict()`` output, validating name, version and fields."""
        if not isinstance(payload, Mapping) or "name" not in payload:
            raise ConfigError(f"a scheme dict needs a 'name' key, got {payload!r}")
        data = dict(payload)
        name = data.pop("name")
        version = data.pop("version", SCHEME_VERSION)
        if version != SCHEME_VERSION:
            raise ConfigError(
                f"scheme {name!r} was written with scheme version {version}, this ondevice reads version "
                f"{SCHEME_VERSION}; re-create the scheme with this version"
            )
        cls = _lookup(name)
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"scheme {name!r} has no field(s) {unknown}; its fields are {sorted(known)}")
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)

    @staticmethod
    def from_json(text: str) -> Scheme:
        """Inverse of :meth:`to_json`."""
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"scheme JSON does not parse: {exc}") from None
        return Scheme.from_dict(payload)


def _lookup(name: object) -> type[Scheme]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownSchemeError(name, _REGISTRY)
    return _REGISTRY[name]


def resolve_scheme(scheme: Scheme | str | Mapping[str, Any]) -> Scheme:
    """Turn a scheme, a scheme name (``"bias"``) or a scheme dict into a scheme object."""
    if isinstance(scheme, Scheme):
        if type(scheme) is Scheme:
            raise ConfigError("Scheme is an abstract base; use one of " + ", ".join(list_schemes()))
        return scheme
    if isinstance(scheme, str):
        return _lookup(scheme)()
    if isinstance(scheme, Mapping):
        return Scheme.from_dict(scheme)
    raise ConfigError(
        f"a scheme must be a Scheme, a name or a dict, got {type(scheme).__name__}; "
        f"valid names are {', '.join(list_schemes())}"
    )


def check_bool(owner: object, name: str) -> None:
    if not isinstance(getattr(owner, name), bool):
        raise ConfigError(f"{type(owner).__name__}.{name} must be a bool, got {getattr(owner, name)!r}")


def check_names(owner: object, name: str) -> None:
    value = getattr(owner, name)
    if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(
            f"{type(owner).__name__}.{name} must be a tuple of qualified module names, got {value!r}"
        )


@dataclass(frozen=True)
class ApplyContext:
    """What a scheme applicator may need besides the model.

    Attributes:
        head: the classifier head's qualified name, or None.
        example: the batch shape and dtype the model can be traced with (see ``ondevice._example``), or
            None when neither the user nor the model states one.
    """

    head: str | None
    example: ExampleSpec | None = None


Applier = Callable[[nn.Module, Scheme, ApplyContext], None]
_APPLIERS: dict[type[Scheme], Applier] = {}


def register_applier(scheme_type: type[Scheme]) -> Callable[[Applier], Applier]:
    """Register how a scheme type is applied (one applicator per scheme class)."""

    def decorate(fn: Applier) -> Applier:
        if scheme_type in _APPLIERS:
            raise ConfigError(f"an applicator for {scheme_type.__name__} is already registered")
        _APPLIERS[scheme_type] = fn
        return fn

    return decorate


def apply_scheme(model: nn.Module, scheme: Scheme, ctx: ApplyContext) -> None:
    """Apply ``scheme`` to ``model`` in place (all parameters must already be frozen)."""
    applier = _APPLIERS.get(type(scheme))
    if applier is None:
        raise UnknownNameError("scheme applicator", type(scheme).__name__, [t.__name__ for t in _APPLIERS])
    applier(model, scheme, ctx)


def train(module: nn.Module, *, recurse: bool = True) -> None:
    """Mark every parameter of ``module`` (and of its children, with ``recurse``) as trainable."""
    for param in module.parameters(recurse=recurse):
        param.requires_grad_(True)


def train_head(model: nn.Module, ctx: ApplyContext, scheme: Scheme) -> None:
    """Mark the classifier head trainable; a scheme that trains it needs one."""
    if ctx.head is None:
        raise ConfigError(
            f"scheme {scheme.name!r} trains the classifier head, but no head was found: the model has no "
            f"'classifier' attribute and no Linear layer. Pass head='qualified.name' to prepare()"
        )
    train(model.get_submodule(ctx.head))


def train_all_biases(model: nn.Module) -> None:
    """Mark every parameter named ``bias`` trainable (convolution, linear and norm shifts)."""
    for name, param in model.named_parameters():
        if name.rpartition(".")[2] == "bias":
            param.requires_grad_(True)
