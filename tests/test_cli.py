"""The ondevice command line, driven through typer's runner and as a real console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from ondevice.cli import app

runner = CliRunner()


def test_transfer_json_summary() -> None:
    result = runner.invoke(
        app, ["transfer", "--quick", "--json", "--schemes", "last_layer,bias,lite_residual"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [o["scheme"] for o in payload["outcomes"]] == ["last_layer", "bias", "lite_residual"]
    assert payload["epochs"] == 2 and payload["source_classes"] == [0, 1, 2, 3, 4]
    for outcome in payload["outcomes"]:
        assert 0.2 < outcome["accuracy"] <= 1.0
        assert 0 < outcome["trainable_params"] < outcome["total_params"]


def test_transfer_rejects_an_unknown_scheme_without_a_traceback() -> None:
    result = runner.invoke(app, ["transfer", "--quick", "--schemes", "bias,nonsense"])
    assert result.exit_code == 2
    assert "unknown scheme 'nonsense'" in result.output and "Traceback" not in result.output


def test_transfer_int8_compression_is_reported_and_leaves_a_relu_network_alone() -> None:
    """int8 compresses what smooth activations keep; the ReLU CNN has none, so nothing changes."""
    runs = {}
    for compress in ("none", "int8"):
        args = ["transfer", "--quick", "--json", "--schemes", "full,last_layer", "--compress", compress]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        runs[compress] = json.loads(result.stdout)
    assert runs["none"]["compress"] is None and runs["int8"]["compress"] == "int8"
    plain, packed = ({o["scheme"]: o for o in runs[k]["outcomes"]} for k in ("none", "int8"))
    for scheme in ("full", "last_layer"):
        assert packed[scheme]["activation_bytes"] == plain[scheme]["activation_bytes"] > 0
        assert packed[scheme]["accuracy"] == plain[scheme]["accuracy"]


def test_transfer_rejects_an_unknown_compression() -> None:
    result = runner.invoke(app, ["transfer", "--quick", "--compress", "int4"])
    assert result.exit_code == 2
    assert "--compress must be 'none' or 'int8', got 'int4'" in result.output
    assert "Traceback" not in result.output


def test_simulate_rejects_a_server_momentum_of_one_before_starting_anything() -> None:
    result = runner.invoke(app, ["simulate", "--clients", "2", "--rounds", "1", "--server-momentum", "1.0"])
    assert result.exit_code == 2
    assert "server_momentum must be in [0, 1)" in result.output and "got 1.0" in result.output
    assert "Traceback" not in result.output


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "ondevice"
    env = {**os.environ, "COLUMNS": "120"}
    done = subprocess.run(
        [str(exe), "--help"], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0
    assert "demo" in done.stdout and "transfer" in done.stdout
