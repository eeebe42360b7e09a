"""The installed package's version, read once from its metadata (one source of truth: pyproject.toml)."""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("ondevice")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a tree that is not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
