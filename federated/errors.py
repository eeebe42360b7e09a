"""Errors of the federated package; they join ondevice's one exception family."""

from __future__ import annotations

from ondevice.errors import OnDeviceError

__all__ = ["FederatedError", "PayloadError"]


class FederatedError(OnDeviceError, RuntimeError):
    """A federated run cannot go on (no valid reply in any round, a mismatched backbone, ...)."""


class PayloadError(OnDeviceError, ValueError):
    """A Flower message carries arrays or configs that are not what this federation exchanges."""
