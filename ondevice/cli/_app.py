"""The typer application every ``ondevice`` subcommand registers on.

Subcommand modules import :data:`app` and decorate their functions. ``ondevice/cli/`` is the application
layer: it imports the upper layers (``memory``, ``devices``, ``federated``) at module level, and nothing
below it imports ``ondevice.cli``, so ``import ondevice`` never pulls in Flower, pyserial or asyncssh.

Text a user typed (paths, names, values) is never parsed as rich markup: :func:`fail`, :func:`say` and
:func:`plain` print it as it is, so ``--data '[x].csv'`` is reported as ``'[x].csv'``.
"""

from __future__ import annotations

import json
import logging
import sys
from importlib import metadata
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from ondevice.errors import OnDeviceError

__all__ = [
    "INTERRUPTED_EXIT_CODE",
    "app",
    "configure_logging",
    "console",
    "fail",
    "interrupted",
    "package_version",
    "plain",
    "print_json",
    "say",
]

#: The exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT_CODE = 130

app = typer.Typer(
    name="ondevice",
    help="On-device continual learning: sparse updates, memory budgets, Flower fleets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console(stderr=True, soft_wrap=True)
"""Progress bars, tables and messages for people go to stderr; ``--json`` output goes to stdout."""


def package_version() -> str:
    """The installed ``ondevice`` distribution's version (its package metadata: the one source of truth)."""
    try:
        return metadata.version("ondevice")
    except metadata.PackageNotFoundError:
        return "unknown (ondevice is not installed; run pip install -e .)"


def _show_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"ondevice {package_version()}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the installed ondevice version and exit.",
            callback=_show_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """On-device continual learning: sparse updates, memory budgets, Flower fleets."""


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


def plain(text: object, style: str = "") -> Text:
    """``text`` as a rich :class:`~rich.text.Text` that is shown as written: never parsed as markup."""
    return Text(str(text), style=style)


def say(*parts: str | Text) -> None:
    """Print a line on stderr; ``str`` parts are literal text (no markup), :class:`Text` parts keep styles."""
    console.print(Text.assemble(*parts), highlight=False)


def fail(error: OnDeviceError | str, code: int = 2) -> NoReturn:
    """Report a user error without a traceback and exit with ``code``.

    The message is printed literally: paths and values a user typed may contain ``[...]``.
    """
    say(plain("error: ", "bold red"), str(error))
    raise typer.Exit(code)


def interrupted(what: str) -> NoReturn:
    """Report that Ctrl-C stopped ``what`` and exit with status 130."""
    say(plain("interrupted: ", "bold yellow"), what)
    raise typer.Exit(INTERRUPTED_EXIT_CODE)
