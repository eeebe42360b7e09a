"""Walk through `ondevice fleet` against stand-in Pis on loopback (real SSH servers, fake systemd).

Starts five stand-in Pis on 127.0.0.1 -- two healthy, one with a 32-bit OS, one that refuses our key,
one whose host key does not match known_hosts -- plus one that is down, writes a client key, a
known_hosts file and an inventory, then runs the same commands the README shows for real Pis:

    python examples/fleet/walkthrough.py            # every step, tables on stderr
    python examples/fleet/walkthrough.py --quick    # the same, fewer log lines

Nothing leaves loopback and nothing outside a temporary directory is touched.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import ondevice.cli.fleet
from devices.testing.standin import StandInFleet, StandInSpec
from ondevice.cli._app import app, console

SPECS = [
    StandInSpec("pi-kitchen"),
    StandInSpec("pi-garage"),
    StandInSpec("pi-old-32bit", machine="armv7l", python_version="3.9.2"),
    StandInSpec("pi-unplugged", mode="down"),
    StandInSpec("pi-new-key", mode="refuse-key"),
    StandInSpec("pi-reinstalled", mode="wrong-host-key"),
]


def ondevice(*args: str) -> int:
    """Run one `ondevice ...` command in-process and return its exit code."""
    console.rule("$ ondevice " + " ".join(args))
    try:
        code = app(list(args), standalone_mode=False)  # returns the exit code of typer.Exit
    except SystemExit as done:
        code = done.code
    return int(code or 0)


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer log lines")
    parser.add_argument("--workdir", type=Path, default=None, help="where keys and the inventory go")
    args = parser.parse_args(argv)
    codes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp, StandInFleet(args.workdir or Path(tmp), SPECS) as fleet:
        inventory = str(fleet.inventory_path)
        console.print(f"inventory: {inventory}")
        healthy = "pi-kitchen,pi-garage"
        codes["check"] = ondevice("fleet", "check", "--inventory", inventory)
        # Provisioning copies the ondevice wheel (built here from this checkout) and the server's pretrained
        # backbone over SFTP. The stand-ins install nothing, so a placeholder backbone file does here; on
        # real Pis leave out --backbone to copy this machine's ~/.cache/ondevice/pretrained/ files.
        backbone = fleet.workdir / "cnn-placeholder.safetensors"
        backbone.write_bytes(b"stand-in backbone")
        codes["provision"] = ondevice(
            "fleet", "provision", "--inventory", inventory, "--hosts", healthy, "--backbone", str(backbone)
        )
        codes["start"] = ondevice("fleet", "start", "--inventory", inventory, "--hosts", healthy)
        codes["status"] = ondevice("fleet", "status", "--inventory", inventory)
        codes["logs"] = ondevice(
            "fleet",
            "logs",
            "--inventory",
            inventory,
            "--hosts",
            "pi-kitchen",
            "--lines",
            "3" if args.quick else "10",
        )
        codes["restart"] = ondevice("fleet", "restart", "--inventory", inventory, "--hosts", healthy)
        codes["stop"] = ondevice("fleet", "stop", "--inventory", inventory, "--hosts", healthy, "--json")
        unit = fleet.hosts["pi-kitchen"].home / "systemd" / "ondevice-supernode.service"
        console.rule(f"the unit `provision` installed on pi-kitchen ({unit.name})")
        console.print(unit.read_text(), markup=False, highlight=False)
    console.print(f"exit codes: {codes}")
    return codes


if __name__ == "__main__":
    main()
