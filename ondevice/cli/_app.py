"""The typer application every ``ondevice`` subcommand registers on.

Subcommand modules import :data:`app` and decorate their functions; they import the upper layers
(``memory``, ``devices``, ``federated``) inside the function bodies so that ``ondevice --help`` stays fast
and ``import ondevice`` never pulls in Flower, pyserial or asyncssh.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import typer
from rich.console import Console

from ondevice.errors import OnDeviceError

app = typer.Typer(
    name="ondevice",
    help="On-device continual learning: sparse updates, memory budgets, Flower fleets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console(stderr=True, soft_wrap=True)
"""Progress bars, tables and messages for people go to stderr; ``--json`` output goes to stdout."""


def configure_logging(verbose: bool) -> None:
    """Only the CLI configures logging; libraries just log."""
    level = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Libraries that set their own loggers to DEBUG (Flower does in a simulation) still propagate to the
    # root handlers: the handlers' level keeps their debug lines out unless --verbose.
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)


def print_json(payload: Any) -> None:
    """Print machine-readable output on stdout."""
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def fail(error: OnDeviceError | str, code: int = 2) -> None:
    """Report a user error without a traceback and exit with ``code``."""
    console.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(code)
