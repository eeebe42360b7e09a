from __future__ import annotations

import json
import shlex
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ondevice.cli.fleet  # noqa: F401  (registers the subcommand)
from devices.fleet import (
    Bundle,
    BundleError,
    Host,
    InventoryError,
    NodeConfig,
    Outcome,
    load_inventory,
    render_supernode_unit,
    run_fleet,
)
from devices.fleet.inventory import parse_inventory
from devices.fleet.remote import provision_script, systemd_quote
from devices.testing.standin import StandInFleet, StandInSpec
from ondevice.cli._app import app
from ondevice.errors import UnknownNameError

pytestmark = pytest.mark.integration

SPECS = [
    StandInSpec("pi-1"),
    StandInSpec("pi-2"),
    StandInSpec("pi-3", machine="armv7l", python_version="3.9.2"),
    StandInSpec("pi-down", mode="down"),
    StandInSpec("pi-badkey", mode="refuse-key"),
    StandInSpec("pi-spoofed", mode="wrong-host-key"),
    StandInSpec("pi-hung", mode="silent"),
]
BROKEN = {
    "pi-down": Outcome.UNREACHABLE,
    "pi-badkey": Outcome.AUTH_REFUSED,
    "pi-spoofed": Outcome.HOST_KEY_MISMATCH,
    "pi-hung": Outcome.TIMEOUT,
}
FAST = {"restart_wait_s": 2.0, "settle_s": 0.1}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with StandInFleet(tmp_path_factory.mktemp("fleet"), SPECS) as standins:
        yield standins


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    """A wheel-named file and a backbone file: the stand-ins' pip installs nothing, SFTP copies them."""
    folder = tmp_path_factory.mktemp("bundle")
    wheel = folder / "ondevice-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
    backbone = folder / "cnn-0123abcd.safetensors"
    backbone.write_bytes(bytes(range(256)) * 8)
    return Bundle(wheel=wheel, backbones=(backbone,))


def outcomes(results) -> dict[str, Outcome]:
    return {r.host: r.outcome for r in results}


def test_check_reports_each_host_precisely(fleet) -> None:
    results = run_fleet(load_inventory(fleet.inventory_path).hosts, "check")
    assert [r.host for r in results] == [s.name for s in SPECS]
    assert outcomes(results) == {"pi-1": Outcome.OK, "pi-2": Outcome.OK, "pi-3": Outcome.FAILED, **BROKEN}
    by_host = {r.host: r for r in results}
    assert by_host["pi-1"].detail == "aarch64, Python 3.11.2"
    assert (
        "'armv7l' is not 64-bit" in by_host["pi-3"].detail and "Python 3.9.2 < 3.11" in by_host["pi-3"].detail
    )
    assert f"connection refused at 127.0.0.1:{fleet.hosts['pi-down'].port}" in by_host["pi-down"].detail
    assert "refused the key" in by_host["pi-badkey"].detail
    assert "known_hosts" in by_host["pi-spoofed"].detail
    hung = by_host["pi-hung"].detail  # accepts TCP, never speaks SSH: named, with what to check
    assert hung.startswith("pi-hung (127.0.0.1:") and "accepts TCP" in hung and "sshd" in hung


def test_every_action_reports_each_host_precisely(fleet, bundle: Bundle) -> None:
    """Provision, start, restart and stop across a fleet with broken hosts: each host gets its own outcome
    and the others go on. What the actions do on a host (a real venv and pip install, SuperNodes that
    really start, stop, restart and fail) is tests/devices/test_fleet_processes.py's; these stand-ins'
    venv, pip and systemctl are shell stubs, so only what crosses SSH and SFTP is checked here."""
    inventory = load_inventory(fleet.inventory_path)
    healthy = inventory.select("pi-1,pi-2")
    results = run_fleet(inventory.hosts, "provision", bundle=bundle, **FAST)
    assert outcomes(results) == {"pi-1": Outcome.OK, "pi-2": Outcome.OK, "pi-3": Outcome.OK, **BROKEN}
    for host in healthy:
        home = fleet.hosts[host.name].home
        unit = (home / "systemd" / "ondevice-supernode.service").read_text()
        assert unit == render_supernode_unit(host)
        # Copied over SFTP, byte for byte, where the unit's ONDEVICE_CACHE_DIR and pip look for them.
        root = home / "ondevice"
        assert (root / "dist" / bundle.wheel.name).read_bytes() == bundle.wheel.read_bytes()
        copied = root / "cache" / "pretrained" / bundle.backbones[0].name
        assert copied.read_bytes() == bundle.backbones[0].read_bytes()
        assert f"ONDEVICE_CACHE_DIR={root}/cache" in unit

    for action in ("stop", "start", "restart"):
        done = run_fleet(inventory.hosts, action, **FAST)
        assert outcomes(done) == {"pi-1": Outcome.OK, "pi-2": Outcome.OK, "pi-3": Outcome.OK, **BROKEN}
    assert run_fleet(healthy, "stop")[0].detail == "inactive"


def test_provision_needs_a_bundle(fleet, tmp_path: Path) -> None:
    hosts = load_inventory(fleet.inventory_path).select("pi-1")
    with pytest.raises(ValueError, match="provision needs"):
        run_fleet(hosts, "provision")
    wheel = tmp_path / "ondevice-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"x")
    with pytest.raises(BundleError, match="no pretrained backbone"):
        Bundle(wheel=wheel, backbones=())
    with pytest.raises(BundleError, match="not a wheel"):
        Bundle(wheel=tmp_path / "nothing.whl", backbones=(wheel,))
    result = CliRunner().invoke(
        app,
        [
            "fleet",
            "provision",
            "-i",
            str(fleet.inventory_path),
            "--hosts",
            "pi-1",
            "--wheel",
            str(wheel),
            "--backbone",
            str(tmp_path / "missing.safetensors"),
        ],
    )
    assert result.exit_code == 2 and "missing.safetensors does not exist" in result.output
    # without --wheel, a bad --wheelhouse or backbone is refused before the wheel is built (about 10 s)
    for bad in (["--wheelhouse", str(tmp_path / "no-such-folder")], ["--backbone", str(tmp_path / "x.st")]):
        args = ["fleet", "provision", "-i", str(fleet.inventory_path), "--hosts", "pi-1"]
        if bad[0] == "--wheelhouse":
            args += ["--backbone", str(wheel)]
        result = CliRunner().invoke(app, [*args, *bad])
        assert result.exit_code == 2, result.output
        assert "building the ondevice wheel" not in result.output and "built " not in result.output
        assert ("is not a folder" if bad[0] == "--wheelhouse" else "x.st does not exist") in result.output


def test_rolling_restart_halts_when_a_host_does_not_come_back(fleet) -> None:
    inventory = load_inventory(fleet.inventory_path)
    hosts = inventory.select(["pi-1", "pi-2", "pi-3"])
    broken = fleet.hosts["pi-2"].home / "state" / "broken"
    broken.touch()
    try:
        results = run_fleet(hosts, "restart", restart_wait_s=0.6)
    finally:
        broken.unlink()
    assert outcomes(results) == {"pi-1": Outcome.OK, "pi-2": Outcome.FAILED, "pi-3": Outcome.SKIPPED}
    assert "failed" in results[1].detail and "pi-2 did not come back" in results[2].detail


def test_cli_json_and_table(fleet) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["fleet", "check", "--inventory", str(fleet.inventory_path), "--json"])
    assert result.exit_code == 1  # some hosts failed
    payload = json.loads(result.stdout)
    assert {r["host"]: r["outcome"] for r in payload}["pi-spoofed"] == "host-key-mismatch"
    assert "2 ok, 5 failed" in result.output  # check: pi-3 is 32-bit, four cannot be reached
    run_fleet(load_inventory(fleet.inventory_path).select("pi-1,pi-2"), "start", **FAST)
    result = runner.invoke(app, ["fleet", "status", "-i", str(fleet.inventory_path), "--hosts", "pi-1,pi-2"])
    assert result.exit_code == 0, result.output
    assert "pi-1" in result.output and "pi-down" not in result.output and "2 ok, 0 failed" in result.output
    result = runner.invoke(
        app, ["fleet", "logs", "-i", str(fleet.inventory_path), "--hosts", "pi-1", "-n", "2"]
    )
    assert result.exit_code == 0 and "log line 2" in result.output
    result = runner.invoke(app, ["fleet", "status", "-i", str(fleet.inventory_path), "--hosts", "pi-9"])
    assert result.exit_code == 2 and "unknown host 'pi-9'" in result.output


def test_insecure_opt_out_is_explicit_and_loud(fleet, tmp_path: Path) -> None:
    text = fleet.inventory_toml().replace("[fleet]\n", "[fleet]\ninsecure_ignore_host_keys = true\n", 1)
    path = tmp_path / "insecure.toml"
    path.write_text(text)
    results = run_fleet(load_inventory(path).select("pi-spoofed"), "logs")
    assert results[0].ok  # only because verification was switched off
    result = CliRunner().invoke(app, ["fleet", "status", "-i", str(path), "--hosts", "pi-spoofed"])
    assert "host key verification is OFF" in result.output


# -- inventory and rendering (no SSH) -------------------------------------------------------------
BASE = {"fleet": {"key": "id", "known_hosts": "kh"}, "hosts": [{"name": "a", "address": "10.0.0.1"}]}


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"hosts": []}, "no hosts"),
        ({"hosts": [{"name": "a"}]}, r"hosts\[0\] \(a\): missing required field 'address'"),
        (
            {"hosts": [{"name": "a", "address": "x", "port": 70000}]},
            r"\(a\): field 'port' must be an integer",
        ),
        ({"hosts": [{"name": "a", "address": "x", "colour": 1}]}, r"\(a\): unknown field 'colour'"),
        ({"hosts": [{"name": "a", "address": "x"}, {"name": "a", "address": "y"}]}, "duplicate host name"),
        ({"hosts": [{"name": "a", "address": "x", "profile": "rpi-9"}]}, r"\(a\): field 'profile'"),
        (
            {"hosts": [{"name": "a", "address": "x", "node": {"partition_id": 3, "num_partitions": 2}}]},
            r"partition_id=3 must be in \[0, num_partitions=2\)",
        ),
        (
            {
                "hosts": [
                    {"name": "a", "address": "x"},
                    {"name": "b", "address": "y", "flower_version": "1.42.0"},
                ]
            },
            "share major.minor",
        ),
        ({"fleet": {"superlink": "no-port"}}, r"\[fleet\]: field 'superlink'"),
        ({"fleet": {"use_sudo": "yes"}}, "true or false"),
        (
            {"hosts": [{"name": "a", "address": "x", "node": {"data_path": "/d"}}]},
            r"\(a\): field 'node.data_path' is not read by the ClientApp",
        ),
        (
            {"hosts": [{"name": "a", "address": "x", "node": {"colour": 1}}]},
            r"unknown field 'node.colour'; the ClientApp reads num_partitions, partition_id, state_dir",
        ),
        ({"hosts": [{"name": "a", "address": "x", "node": {"state_dir": 'a"b'}}]}, "without double quotes"),
    ],
)
def test_inventory_validation_names_host_and_field(patch, match) -> None:
    with pytest.raises(InventoryError, match=match):
        parse_inventory(BASE | patch, base=Path("/inv"))


def test_inventory_defaults_and_paths(tmp_path: Path) -> None:
    path = tmp_path / "inv.toml"
    path.write_text(
        '[fleet]\nkey = "keys/id"\nuser = "ops"\n\n[[hosts]]\nname = "a"\naddress = "10.0.0.1"\n'
        'user = "pi"\nnode = { partition_id = 1, num_partitions = 2 }\n'
    )
    (host,) = load_inventory(path).hosts
    assert host.key == tmp_path / "keys" / "id" and host.user == "pi" and host.port == 22
    # The keys the ClientApp reads, with the state under the SSH user's own remote_dir by default.
    assert host.node_config.as_flower_string() == (
        'partition-id=1 num-partitions=2 state-dir="/home/pi/ondevice/state"'
    )
    assert host.superlink.endswith(":8000")  # Flower 1.41 serves every API on the SuperLink's one port
    with pytest.raises(UnknownNameError):
        load_inventory(path).select("b")
    with pytest.raises(InventoryError, match="not valid TOML"):
        path.write_text("[fleet")
        load_inventory(path)


def test_render_unit_quotes_and_flags() -> None:
    host = Host(
        name="pi-x",
        address="10.0.0.2",
        user="pi",
        superlink="10.0.0.1:9092",
        root_certificates="/etc/flower/my ca.crt",
        auth_key="/etc/flower/key",
        node=NodeConfig(partition_id=0, num_partitions=2, state_dir="/home/pi/state 1"),
    )
    unit = render_supernode_unit(host)
    assert "SupplementaryGroups=dialout" in unit and "User=pi" in unit
    assert "Restart=always" in unit.splitlines() and "RestartSec=30" in unit.splitlines()
    assert "StartLimitIntervalSec=0" in unit.splitlines()  # systemd never stops restarting it
    assert "Environment=PATH=/home/pi/ondevice/venv/bin:/usr/local/bin:/usr/bin:/bin" in unit.splitlines()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start == (
        "ExecStart=/home/pi/ondevice/venv/bin/flower-supernode --superlink 10.0.0.1:9092 "
        '--root-certificates "/etc/flower/my ca.crt" --auth-supernode-private-key /etc/flower/key '
        '--node-config "partition-id=0 num-partitions=2 state-dir=\\"/home/pi/state 1\\""'
    )
    assert systemd_quote("100%$HOME") == '"100%%$$HOME"'
    nasty = Host(name="pi-y", address="h", remote_dir="/tmp/x'; rm -rf / #")
    script = provision_script(nasty, "ondevice-0.1.0-py3-none-any.whl")
    assert shlex.quote("/tmp/x'; rm -rf / #/venv") in script


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (bytes(range(128, 256)), "is not UTF-8 text"),  # a binary file: no UnicodeDecodeError
        (None, "cannot be read"),  # a directory: no IsADirectoryError
    ],
)
def test_inventory_that_is_not_a_text_file_is_an_inventory_error(
    tmp_path: Path, content: bytes | None, match: str
) -> None:
    path = tmp_path / "fleet.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(InventoryError, match=match):
        load_inventory(path)


@pytest.mark.slow
def test_build_wheel_from_the_checkout_holds_every_package(tmp_path: Path) -> None:
    from devices.fleet import build_wheel

    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "ondevice/__init__.py",
        "memory/__init__.py",
        "devices/fleet/commands.py",
        "federated/apps.py",
    ):
        assert module in names, module
    assert Bundle(wheel=wheel, backbones=(wheel,)).wheel == wheel


def test_wheel_builds_of_one_tree_take_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """setuptools builds inside the tree, so two builds at once (parallel tests, two provisions) broke each
    other; build_wheel runs pip while holding the tree's lock, and a second holder has to wait."""
    import fcntl
    import subprocess

    from devices.fleet import bundle as bundle_module

    root = tmp_path / "tree"
    root.mkdir()

    def lock_is_taken() -> bool:
        with bundle_module.build_lock_path(root).open("a") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(other, fcntl.LOCK_UN)
            return False

    with bundle_module.build_lock(root):
        assert lock_is_taken()
    assert not lock_is_taken()
    held_during_pip = []

    def pip(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        held_during_pip.append(lock_is_taken())
        return subprocess.CompletedProcess(args, 1, "", "ERROR: stop here")

    monkeypatch.setattr(bundle_module.subprocess, "run", pip)
    with pytest.raises(BundleError, match="stop here"):
        bundle_module.build_wheel(tmp_path / "dist", root=root)
    assert held_during_pip == [True] and not lock_is_taken()
