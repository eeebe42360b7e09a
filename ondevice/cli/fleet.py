"""``ondevice fleet``: check, provision and drive the Flower SuperNodes of a Raspberry Pi fleet over SSH."""

from __future__ import annotations

from pathlib import Path

import typer

from devices.fleet import Bundle, build_wheel, find_backbones, load_inventory, run_fleet, summary
from devices.fleet.bundle import WHEELHOUSE_COMMAND
from ondevice.cli._app import app, configure_logging, console, fail, interrupted, plain, print_json, say
from ondevice.errors import OnDeviceError

fleet_app = typer.Typer(
    name="fleet",
    help="Manage a fleet of Raspberry Pis over SSH (needs the 'fleet' extra: asyncssh).",
    no_args_is_help=True,
)
app.add_typer(fleet_app, name="fleet")

_INVENTORY = typer.Option(..., "--inventory", "-i", help="Inventory TOML file.", dir_okay=False)
_HOSTS = typer.Option(None, "--hosts", help="Comma-separated host names (default: all).")
_JSON = typer.Option(False, "--json", help="Print JSON on stdout.")
_CONCURRENCY = typer.Option(8, "--concurrency", min=1, help="Hosts worked on at once.")
_VERBOSE = typer.Option(False, "--verbose", "-v", help="Debug logging.")
_WHEEL = typer.Option(
    None, "--wheel", help="ondevice wheel to install (default: built from this checkout).", dir_okay=False
)
_BACKBONE = typer.Option(
    None,
    "--backbone",
    help="Pretrained backbone file to copy (repeatable; default: every file of the local cache's "
    "pretrained/ folder).",
    dir_okay=False,
)
_WHEELHOUSE = typer.Option(
    None,
    "--wheelhouse",
    help="Folder of wheels for the Pis (pinned flwr, torch and every dependency): copied over SFTP and "
    "installed with `pip install --no-index --find-links`, so the Pis need no internet. Fill it on a machine "
    "with internet: " + WHEELHOUSE_COMMAND,
    file_okay=False,
)
_WAIT_S = typer.Option(60.0, "--wait-s", help="Seconds to wait for the unit to run, per host.")


def _run(
    action: str,
    inventory: Path,
    hosts: str | None,
    json_output: bool,
    concurrency: int,
    verbose: bool,
    **options: object,
) -> None:
    configure_logging(verbose)

    try:
        selected = load_inventory(inventory).select(hosts)
        if action == "provision":
            options["bundle"] = _bundle(
                options.pop("wheel"),  # type: ignore[arg-type]
                options.pop("backbone"),  # type: ignore[arg-type]
                options.pop("wheelhouse"),  # type: ignore[arg-type]
            )
    except OnDeviceError as error:
        fail(error)
        return
    try:
        import asyncssh  # noqa: F401
    except ImportError:
        fail("the fleet commands need asyncssh: pip install 'ondevice[fleet]'")
        return

    for host in selected:
        if host.insecure_ignore_host_keys:
            say(
                plain("WARNING: ", "bold red"),
                f"{host.name}: host key verification is OFF "
                "(insecure_ignore_host_keys = true); anyone on the network can impersonate it",
            )
    try:
        with console.status(plain(f"{action} on {len(selected)} host(s)..."), spinner="dots"):
            results = run_fleet(selected, action, concurrency=concurrency, **options)
    except KeyboardInterrupt:
        interrupted(
            f"fleet {action} stopped on {len(selected)} host(s); hosts may be part-way through it: "
            f"run 'ondevice fleet status' to see where each one is"
        )
    if json_output:
        print_json([r.to_dict() for r in results])
    else:
        from rich.table import Table

        table = Table(title=f"fleet {action}")
        for column in ("host", "outcome", "detail", "seconds"):
            table.add_column(column, overflow="fold")
        for r in results:
            color = "green" if r.ok else ("yellow" if r.outcome.value == "skipped" else "red")
            # Host names and details come from the inventory and the hosts: shown as written, never markup.
            table.add_row(
                plain(r.host), plain(r.outcome.value, color), plain(r.detail), f"{r.duration_s:.2f}"
            )
        console.print(table)
        if action == "logs":
            for r in results:
                if r.ok:
                    console.rule(plain(r.host))
                    console.print(r.stdout.rstrip(), markup=False, highlight=False)
    say(plain(summary(results), "bold green" if all(r.ok for r in results) else "bold red"))
    if not all(r.ok for r in results):
        raise typer.Exit(1)


def _bundle(wheel: Path | None, backbones: list[Path] | None, wheelhouse: Path | None) -> object:
    """The wheel (given, or built from this checkout), the backbone files (given, or the local cache's) and
    the wheelhouse, if given."""
    import tempfile

    backbone_files = tuple(backbones) if backbones else find_backbones()
    Bundle.check_sources(backbone_files, wheelhouse)  # before the build: a bad path should cost nothing
    if wheel is None:
        with console.status(plain("building the ondevice wheel (pip wheel --no-deps)..."), spinner="dots"):
            wheel = build_wheel(Path(tempfile.mkdtemp(prefix="ondevice-wheel-")))
        say(f"built {wheel}")
    return Bundle(wheel=wheel, backbones=backbone_files, wheelhouse=wheelhouse)


@fleet_app.command("check")
def check(
    inventory: Path = _INVENTORY,
    hosts: str | None = _HOSTS,
    json_output: bool = _JSON,
    concurrency: int = _CONCURRENCY,
    verbose: bool = _VERBOSE,
) -> None:
    """Verify each Pi runs a 64-bit OS (aarch64) and Python >= 3.11."""
    _run("check", inventory, hosts, json_output, concurrency, verbose)


@fleet_app.command("provision")
def provision(
    inventory: Path = _INVENTORY,
    hosts: str | None = _HOSTS,
    json_output: bool = _JSON,
    concurrency: int = _CONCURRENCY,
    wheel: Path | None = _WHEEL,
    backbone: list[Path] | None = _BACKBONE,
    wheelhouse: Path | None = _WHEELHOUSE,
    wait_s: float = _WAIT_S,
    verbose: bool = _VERBOSE,
) -> None:
    """Copy the ondevice wheel and the pretrained backbone, install them in a venv, install + start the unit.

    Over SFTP: the wheel (built from this checkout unless --wheel) and the backbone files (this machine's
    pretrained cache unless --backbone) and, for Pis without internet, the --wheelhouse; then a venv with
    pinned flwr/torch and the wheel (from the wheelhouse alone when given), a check that it imports
    ondevice and federated, and the flower-supernode unit, enabled and started: a host whose unit does not
    keep running fails.
    """
    _run(
        "provision",
        inventory,
        hosts,
        json_output,
        concurrency,
        verbose,
        wheel=wheel,
        backbone=backbone,
        wheelhouse=wheelhouse,
        restart_wait_s=wait_s,
    )


@fleet_app.command("start")
def start(
    inventory: Path = _INVENTORY,
    hosts: str | None = _HOSTS,
    json_output: bool = _JSON,
    concurrency: int = _CONCURRENCY,
    wait_s: float = _WAIT_S,
    verbose: bool = _VERBOSE,
) -> None:
    """Start the SuperNode unit on each Pi; a unit that does not keep running is a failed host."""
    _run("start", inventory, hosts, json_output, concurrency, verbose, restart_wait_s=wait_s)


@fleet_app.command("stop")
def stop(
    inventory: Path = _INVENTORY,
    hosts: str | None = _HOSTS,
    json_output: bool = _JSON,
    concurrency: int = _CONCURRENCY,
    verbose: bool = _VERBOSE,
) -> None:
    """Stop the SuperNode unit on each Pi."""
    _run("stop", inventory, hosts, json_output, concurrency, verbose)


@fleet_app.command("restart")
def restart(
    inventory: Path = _INVENTORY,
    hosts: str | None = _HOSTS,
    json_output: bool = _JSON,
    wait_s: float = _WAIT_S,
    verbose: bool = _VERBOSE,
) -> None:
    """Rolling restart: one Pi at a time, each 'active' again before the next; stops at a failure."""
    _run("restart", inventory, hosts, json_output, 1, verbose, restart_wait_s=wait_s)


@fleet_app.command("status")
def status(
    inventory: Path = _INVENTORY,
    hosts: str | None = _HOSTS,
    json_output: bool = _JSON,
    concurrency: int = _CONCURRENCY,
    verbose: bool = _VERBOSE,
) -> None:
    """Show the SuperNode unit's state on each Pi; a unit that is not running is a failed host."""
    _run("status", inventory, hosts, json_output, concurrency, verbose)


@fleet_app.command("logs")
def logs(
    inventory: Path = _INVENTORY,
    hosts: str | None = _HOSTS,
    json_output: bool = _JSON,
    lines: int = typer.Option(50, "--lines", "-n", min=1, help="Journal lines per host."),
    concurrency: int = _CONCURRENCY,
    verbose: bool = _VERBOSE,
) -> None:
    """Show the last journal lines of the SuperNode unit on each Pi."""
    _run("logs", inventory, hosts, json_output, concurrency, verbose, log_lines=lines)
