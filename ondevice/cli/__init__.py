"""The ``ondevice`` command line."""

from __future__ import annotations

from ondevice.cli import demo as _demo  # noqa: F401  (registers the subcommand)
from ondevice.cli import devices as _devices  # noqa: F401  (registers the subcommand)
from ondevice.cli import fleet as _fleet  # noqa: F401  (registers the subcommand)
from ondevice.cli import plan as _plan  # noqa: F401  (registers the subcommand)
from ondevice.cli import simulate as _simulate  # noqa: F401  (registers the subcommand)
from ondevice.cli import train as _train  # noqa: F401  (registers the subcommand)
from ondevice.cli import transfer as _transfer  # noqa: F401  (registers the subcommand)
from ondevice.cli._app import app

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``ondevice`` console script."""
    app()
