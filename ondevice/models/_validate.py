"""Argument checks shared by the model factories (private)."""

from __future__ import annotations

from collections.abc import Sequence

from ondevice.errors import ConfigError


def positive_int(field: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise a ConfigError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{field} must be an integer >= {minimum}, got {value!r}")
    return value


def positive_float(field: str, value: object) -> float:
    """Return ``value`` as float if it is a number > 0, else raise a ConfigError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{field} must be a number > 0, got {value!r}")
    return float(value)


def probability(field: str, value: object) -> float:
    """Return ``value`` as float if it lies in [0, 1), else raise a ConfigError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError(f"{field} must be a number in [0, 1), got {value!r}")
    return float(value)


def int_tuple(field: str, value: object) -> tuple[int, ...]:
    """Return ``value`` as a non-empty tuple of positive ints, else raise a ConfigError naming ``field``."""
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ConfigError(f"{field} must be a non-empty sequence of positive integers, got {value!r}")
    return tuple(positive_int(f"{field}[{i}]", v) for i, v in enumerate(value))
