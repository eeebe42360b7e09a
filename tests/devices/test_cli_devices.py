from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

import ondevice.cli.devices  # noqa: F401  (registers the subcommand)
from ondevice.cli._app import app


def test_devices_lists_profiles_as_json() -> None:
    result = CliRunner().invoke(app, ["devices", "--json"])
    assert result.exit_code == 0, result.output
    names = {p["name"]: p for p in json.loads(result.stdout)}
    assert names["stm32f746"]["training_budget_bytes"] == 280 * 1024
    assert "rpi-5-16gb" in names and "jetson-nano-4gb" in names


def test_devices_table_and_kind_filter() -> None:
    result = CliRunner().invoke(app, ["devices", "--kind", "mcu"])
    assert result.exit_code == 0 and "rp2040" in result.output and "rpi-4b" not in result.output
    result = CliRunner().invoke(app, ["devices", "--kind", "toaster"])
    assert result.exit_code == 2 and "toaster" in result.output


def test_devices_detect() -> None:
    result = CliRunner().invoke(app, ["devices", "--detect", "--json"])
    assert result.exit_code == 0
    (profile,) = json.loads(result.stdout)
    assert profile["training_budget_bytes"] > 0


def test_import_ondevice_and_devices_stay_light() -> None:
    code = (
        "import sys, ondevice, devices, devices.fleet, devices.link, devices.testing.emulator; "
        "print(sorted(m for m in ('serial', 'asyncssh', 'flwr') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_devices_table_never_cuts_the_names_device_takes_at_80_columns() -> None:
    """``--device`` takes these names: a narrow terminal wraps other columns, never the names."""
    import os
    from pathlib import Path

    import devices

    exe = Path(sys.executable).parent / "ondevice"
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run([str(exe), "devices"], capture_output=True, text=True, env=env, check=True)
    assert "…" not in done.stderr
    names = {line.split()[0] for line in done.stderr.splitlines() if line.strip()}
    assert {p.name for p in devices.list_profiles()} <= names
