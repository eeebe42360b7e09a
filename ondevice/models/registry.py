"""The model zoo's registry: ``register_model`` over factory functions, ``create_model`` by name.

Modelled on timm's ``create_model``: every factory takes keyword-only arguments and returns a
:class:`~ondevice.models.base.ClassifierModel`. Unknown names and unknown keyword arguments are rejected
with messages that list what is valid.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from ondevice.errors import ConfigError, UnknownModelError
from ondevice.models.base import ClassifierModel

__all__ = ["create_model", "list_models", "model_defaults", "register_model"]

logger = logging.getLogger(__name__)

Factory = Callable[..., ClassifierModel]
F = TypeVar("F", bound=Factory)

_MODELS: dict[str, Factory] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Register a model factory under ``name`` (a decorator).

    The factory must take keyword-only arguments and return a :class:`ClassifierModel`. Registering a
    name twice raises :class:`~ondevice.errors.ConfigError`.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model name must be a non-empty string, got {name!r}")

    def decorator(factory: F) -> F:
        if name in _MODELS:
            raise ConfigError(
                f"model {name!r} is already registered (by {_MODELS[name].__module__}."
                f"{_MODELS[name].__qualname__}); choose another name"
            )
        _MODELS[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_MODELS)


def _get_factory(name: str) -> Factory:
    try:
        return _MODELS[name]
    except (KeyError, TypeError):
        raise UnknownModelError(name, _MODELS) from None


def model_defaults(name: str) -> dict[str, Any]:
    """The keyword arguments ``name``'s factory accepts, with their default values."""
    factory = _get_factory(name)
    return {
        p.name: p.default
        for p in inspect.signature(factory).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def create_model(name: str, **kwargs: Any) -> ClassifierModel:
    """Build the registered model ``name`` with ``kwargs`` passed to its factory.

    Raises :class:`~ondevice.errors.UnknownModelError` (listing the registered names) for an unknown
    name and :class:`~ondevice.errors.ConfigError` naming the field for an unknown or invalid argument.
    The result remembers how it was built in ``model_name`` and ``model_kwargs``.
    """
    factory = _get_factory(name)
    accepted = model_defaults(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"model {name!r} got unknown argument(s) {', '.join(unknown)}; it accepts: "
            f"{', '.join(sorted(accepted))}. Remove or rename the offending field."
        )
    model = factory(**kwargs)
    if not isinstance(model, ClassifierModel):
        raise ConfigError(
            f"factory for model {name!r} returned {type(model).__name__}, not a ClassifierModel"
        )
    model.model_name = name
    model.model_kwargs = dict(kwargs)
    logger.debug("created model %s with %s", name, kwargs)
    return model
