"""``ondevice devices``: list the device profiles, or detect the one this machine matches."""

from __future__ import annotations

import typer

import devices
from ondevice.cli._app import app, configure_logging, console, fail, print_json, say
from ondevice.errors import OnDeviceError


def _mib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024**2:,.0f} MiB" if n >= 1024**2 else f"{n / 1024:,.0f} KiB"


@app.command("devices")
def devices_command(
    detect: bool = typer.Option(
        False, "--detect", help="Detect this machine's profile (Pi revision, cgroups)."
    ),
    kind: str | None = typer.Option(None, "--kind", help="Only 'linux-board' or 'mcu' profiles."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """List device profiles and the memory a training step may use on each (or --detect this machine)."""
    configure_logging(verbose)

    try:
        profiles = [devices.detect()] if detect else devices.list_profiles(kind)
    except (OnDeviceError, ValueError) as error:
        fail(error if isinstance(error, OnDeviceError) else str(error))
        return
    if json_output:
        print_json([p.to_dict() for p in profiles])
        return
    from rich import box
    from rich.table import Table

    table = Table(
        title="detected device" if detect else "device profiles",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    # The names are what --device takes: never cut; the other columns wrap on a narrow terminal.
    name_width = max([len("name"), *(len(p.name) for p in profiles)])
    table.add_column("name", no_wrap=True, min_width=name_width)
    table.add_column("kind", overflow="fold")
    for column in ("cores", "clock", "memory", "flash", "runtime", "training budget"):
        table.add_column(column, justify="right", overflow="fold")
    for p in profiles:
        table.add_row(
            p.name,
            p.kind.value,
            str(p.cores),
            f"{p.clock_mhz} MHz",
            _mib(p.memory_bytes),
            _mib(p.flash_bytes),
            _mib(p.reserved_bytes),
            _mib(p.training_budget_bytes),
        )
    console.print(table)
    if detect:
        say(profiles[0].description)
