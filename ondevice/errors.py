"""The one exception family of ondevice.

Every error a user can trigger derives from :class:`OnDeviceError` and from the builtin that matches it,
so ``except ValueError`` keeps working for callers that do not know this package. Messages say what was
given, what is allowed and how to fix it.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "BudgetExceededError",
    "CheckpointError",
    "CheckpointMismatchError",
    "ConfigError",
    "InputDtypeError",
    "InputShapeError",
    "NonFiniteBatchError",
    "OnDeviceError",
    "StockAutogradWarning",
    "UnknownModelError",
    "UnknownNameError",
    "UnknownSchemeError",
    "UnsupportedModuleError",
    "format_choices",
]


def format_choices(choices: Iterable[object]) -> str:
    """Render a sorted, comma-separated list of valid choices for an error message."""
    return ", ".join(repr(c) for c in sorted(choices, key=str))


def _plural(noun: str) -> str:
    """English plural of a registry's kind name: strategy -> strategies, scheme -> schemes."""
    if noun.endswith("y") and noun[-2:-1] not in ("a", "e", "i", "o", "u"):
        return noun[:-1] + "ies"
    return noun + "s"


class OnDeviceError(Exception):
    """Base class of every error raised by ondevice on bad input or state."""


class ConfigError(OnDeviceError, ValueError):
    """A configuration object (scheme, optimizer, learner settings, ...) has an invalid field."""


class UnknownNameError(OnDeviceError, ValueError):
    """A name looked up in a registry is not registered."""

    def __init__(self, kind: str, name: object, choices: Iterable[object]) -> None:
        self.kind = kind
        self.name = name
        self.choices = sorted(str(c) for c in choices)
        super().__init__(
            f"unknown {kind} {name!r}; valid {_plural(kind)} are: {format_choices(self.choices)}. "
            f"Pass one of these names (or register your own)."
        )


class UnknownSchemeError(UnknownNameError):
    """An update scheme name is not one of the registered schemes."""

    def __init__(self, name: object, choices: Iterable[object]) -> None:
        super().__init__("scheme", name, choices)


class UnknownModelError(UnknownNameError):
    """A model name is not in the model zoo."""

    def __init__(self, name: object, choices: Iterable[object]) -> None:
        super().__init__("model", name, choices)


class UnsupportedModuleError(OnDeviceError, TypeError):
    """``prepare(..., strict=True)`` met layers without a memory-saving op; every one is named."""

    def __init__(self, offenders: dict[str, str], supported: Iterable[str]) -> None:
        self.offenders = dict(offenders)
        listing = "; ".join(f"{name or '<root>'} ({kind})" for name, kind in self.offenders.items())
        count = len(self.offenders)
        super().__init__(
            f"{count} {'layer' if count == 1 else 'layers'} without a memory-saving op: {listing}. With "
            f"strict=True prepare refuses them; without it they run on stock autograd (keeping what stock "
            f"PyTorch keeps). Layers with an op: {', '.join(sorted(supported))}. Register an op for these "
            f"types with ondevice.ops.register_op, or call prepare without strict=True."
        )


class StockAutogradWarning(UserWarning):
    """Some layers of a prepared model have no memory-saving op and run on stock autograd."""


class InputShapeError(OnDeviceError, ValueError):
    """A batch does not have the shape the model expects."""


class InputDtypeError(OnDeviceError, TypeError):
    """A batch does not have a floating-point dtype (inputs) or integer dtype (labels)."""


class NonFiniteBatchError(OnDeviceError, FloatingPointError):
    """A batch or its loss contains NaN or Inf (raised only when the trainer is told not to skip)."""


class CheckpointError(OnDeviceError, ValueError):
    """A checkpoint file is missing, truncated, corrupt or not an ondevice checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint belongs to another model or another update scheme."""


class BudgetExceededError(OnDeviceError, ValueError):
    """No update scheme (or not the requested one) fits the memory budget."""

    def __init__(self, message: str, *, budget_bytes: int, smallest_bytes: int | None = None) -> None:
        self.budget_bytes = budget_bytes
        self.smallest_bytes = smallest_bytes
        super().__init__(message)
