"""The ondevice command line, driven through typer's runner and as a real console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
    assert "--compress must be one of 'none', 'int8', '2bit', got 'int4'" in result.output
    assert "Traceback" not in result.output


def test_simulate_rejects_a_server_momentum_of_one_before_starting_anything() -> None:
    result = runner.invoke(app, ["simulate", "--clients", "2", "--rounds", "1", "--server-momentum", "1.0"])
    assert result.exit_code == 2
    assert "--server-momentum must be in [0, 1)" in result.output and "got 1.0" in result.output
    assert "Traceback" not in result.output


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "ondevice"
    env = {**os.environ, "COLUMNS": "120"}
    done = subprocess.run(
        [str(exe), "--help"], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0
    assert "demo" in done.stdout and "transfer" in done.stdout


def _console(*args: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    """Run the installed console script, as a user would."""
    exe = Path(sys.executable).parent / "ondevice"
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def test_version_is_the_installed_package_version() -> None:
    from importlib.metadata import version

    done = _console("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"ondevice {version('ondevice')}\n"


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        # rich used to read these as markup: '[[hosts]]' became '[]', '[/x]' crashed with MarkupError.
        ("empty.toml", b"", "add at least one [[hosts]] table"),
        ("a[/x].toml", None, "inventory file 'a[/x].toml' does not exist"),
        ("[x].toml", None, "inventory file '[x].toml' does not exist"),
        ("[red]b.toml", b"\xff\xfe\x00binary", "'[red]b.toml' is not UTF-8 text"),
    ],
)
def test_errors_show_user_text_as_typed_and_never_a_traceback(
    tmp_path: Path, name: str, content: bytes | None, expected: str
) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        result = runner.invoke(app, ["fleet", "check", "--inventory", name])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--server-momentum", "1.0"], "--server-momentum must be in [0, 1)"),
        (["--aggregation", "fedprox"], "--aggregation fedprox needs --mu > 0, got --mu 0.0; set --mu 0.01"),
        (["--mu", "0.1"], "--mu only applies to --aggregation fedprox"),
        (["--aggregation", "fedprox", "--mu", "0.1", "--strategy", "lwf"], "combined with --strategy lwf"),
        (["--partition", "zipf"], "--partition zipf is invalid"),
        (["--compression", "zip"], "--compression: unknown compression 'zip'"),
        (["--scheme", "nope"], "--scheme: unknown scheme 'nope'"),
        (["--scheme", "{bad"], "--scheme '{bad' is not valid JSON"),
        (["--strategy", "forget"], "--strategy must be one of"),
        (["--buffer-size", "1", "--server-lr", "0"], "--server-lr must be a number > 0"),
        (["--frozen-weights", "int4"], "--frozen-weights must be one of 'float', 'int8', got 'int4'"),
        (["--frozen-weights", "int8", "--scheme", "full"], "use --frozen-weights float with 'full'"),
    ],
)
def test_simulate_errors_name_the_flags_not_the_api_fields(args: list[str], expected: str) -> None:
    result = runner.invoke(app, ["simulate", *args])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert expected in text
    for api_name in ("FederatedConfig", "proximal_mu", "server_momentum", "server_lr", "strategy="):
        assert api_name not in text


def test_simulate_help_shows_the_federated_config_defaults() -> None:
    from federated import FederatedConfig

    defaults = FederatedConfig()
    text = " ".join(_console("simulate", "--help").stdout.split())
    for flag, value in (
        ("--clients", defaults.num_clients),
        ("--lr", defaults.lr),
        ("--partition", defaults.partition),
    ):
        assert f"[default: ({value})]" in text.split(flag, 1)[1].split("--", 1)[0], flag


@pytest.mark.parametrize("schemes", ["", " , ", "full,nosuch", "nosuch,full", "bias,bias"])
def test_transfer_checks_schemes_before_any_training(schemes: str) -> None:
    result = runner.invoke(app, ["transfer", "--quick", "--schemes", schemes])
    assert result.exit_code == 2, result.output
    assert "--schemes" in result.output
    assert "pretrained on digits" not in result.output and "accuracy" not in result.output


def test_run_transfer_checks_schemes_before_pretraining() -> None:
    from memory.transfer import run_transfer
    from ondevice.errors import ConfigError, UnknownSchemeError

    with pytest.raises(ConfigError, match="at least one scheme"):
        run_transfer("cnn", schemes=())
    with pytest.raises(UnknownSchemeError, match="nosuch"):
        run_transfer("cnn", schemes=("full", "nosuch"), model_that_does_not_exist=True)


def test_transfer_writes_nothing_to_stdout_without_json() -> None:
    done = _console("transfer", "--quick", "--schemes", "last_layer")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "last_layer" in done.stderr
