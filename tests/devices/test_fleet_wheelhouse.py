"""Provisioning Pis without internet: a wheelhouse copied over SFTP and installed with no package index.

The pip command provisioning runs on a Pi is run here for real, in a real venv, against a wheelhouse of
small generated wheels (stand-ins for flwr, torch and their dependencies, which are not downloaded), with
``--no-index``: what it installs can only come from the wheelhouse.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ondevice.cli.fleet  # noqa: F401  (registers the subcommand)
from devices.fleet import Bundle, BundleError, Host, Outcome, load_inventory, run_fleet
from devices.fleet.bundle import WHEELHOUSE_COMMAND
from devices.fleet.remote import dist_dir, pip_install_args, provision_script, wheelhouse_dir
from devices.testing.standin import StandInFleet, StandInSpec
from ondevice.cli._app import app

pytestmark = pytest.mark.integration

FAST = {"restart_wait_s": 2.0, "settle_s": 0.1}


def make_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel of distribution ``name`` (one module, ``<name>_probe``)."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}_probe/__init__.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": "\n".join(
            ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
            + [f"Requires-Dist: {r}" for r in requires]
        )
        + "\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: ondevice-tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    folder = tmp_path / "wheelhouse"
    folder.mkdir()
    make_wheel(folder, "flwr", "1.41.0", ("probe-dep>=1",))
    make_wheel(folder, "torch", "2.13.0")
    make_wheel(folder, "probe-dep", "1.0")
    return folder


@pytest.fixture
def ondevice_wheel(tmp_path: Path) -> Path:
    folder = tmp_path / "dist"
    folder.mkdir()
    return make_wheel(folder, "ondevice", "0.1.0", ("probe-dep",))


def test_the_pi_pip_command_installs_from_the_wheelhouse_alone(
    tmp_path: Path, wheelhouse: Path, ondevice_wheel: Path
) -> None:
    host = Host(name="pi", address="127.0.0.1", remote_dir=str(tmp_path / "pi"), torch_spec="torch==2.13.0")
    for folder, files in ((wheelhouse_dir(host), wheelhouse.iterdir()), (dist_dir(host), [ondevice_wheel])):
        Path(folder).mkdir(parents=True)
        for path in files:
            shutil.copy(path, folder)
    venv = Path(host.remote_root) / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # No pip settings of this machine (PIP_FIND_LINKS, pip.conf): the wheelhouse is all pip may see.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    command = pip_install_args(host, ondevice_wheel.name, offline=True)
    assert command[3:6] == ["--no-index", "--find-links", wheelhouse_dir(host)]
    assert " ".join(command[3:6]) in provision_script(host, ondevice_wheel.name, offline=True)

    # A wheelhouse that lacks a pinned requirement: pip finds nothing else (no index) and says so, which is
    # what provisioning turns into "refill it with `pip download ...`".
    torch = Path(wheelhouse_dir(host)) / "torch-2.13.0-py3-none-any.whl"
    torch.rename(tmp_path / torch.name)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert done.returncode != 0
    assert "No matching distribution found for torch==2.13.0" in done.stderr, done.stderr

    (tmp_path / torch.name).rename(torch)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    versions = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; "
            "print(*(m.version(d) for d in ('flwr', 'torch', 'probe-dep', 'ondevice')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert versions == ["1.41.0", "2.13.0", "1.0", "0.1.0"]


def test_a_wheelhouse_must_hold_flwr_and_torch(
    tmp_path: Path, wheelhouse: Path, ondevice_wheel: Path
) -> None:
    backbone = tmp_path / "cnn-0123abcd.safetensors"
    backbone.write_bytes(bytes(64))
    with pytest.raises(BundleError, match=r"is not a folder; pass --wheelhouse DIR.*pip download"):
        Bundle(wheel=ondevice_wheel, backbones=(backbone,), wheelhouse=tmp_path / "missing")
    (wheelhouse / "torch-2.13.0-py3-none-any.whl").unlink()
    with pytest.raises(BundleError, match=r"has no torch wheel \(it holds flwr, probe-dep\).*--platform"):
        Bundle(wheel=ondevice_wheel, backbones=(backbone,), wheelhouse=wheelhouse)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match=r"has no flwr or torch wheel \(it holds no wheels\)"):
        Bundle(wheel=ondevice_wheel, backbones=(backbone,), wheelhouse=empty)
    assert "--only-binary=:all:" in WHEELHOUSE_COMMAND and "manylinux2014_aarch64" in WHEELHOUSE_COMMAND


def test_provision_copies_the_wheelhouse_once_and_installs_offline(
    tmp_path: Path, wheelhouse: Path, ondevice_wheel: Path
) -> None:
    backbone = tmp_path / "cnn-0123abcd.safetensors"
    backbone.write_bytes(bytes(range(256)))
    bundle = Bundle(wheel=ondevice_wheel, backbones=(backbone,), wheelhouse=wheelhouse)
    with StandInFleet(tmp_path / "fleet", [StandInSpec("pi-1")]) as fleet:
        hosts = load_inventory(fleet.inventory_path).hosts
        try:
            first = run_fleet(hosts, "provision", bundle=bundle, **FAST)
            again = run_fleet(hosts, "provision", bundle=bundle, **FAST)
            cli = CliRunner().invoke(
                app,
                [
                    "fleet",
                    "provision",
                    "-i",
                    str(fleet.inventory_path),
                    "--wheel",
                    str(ondevice_wheel),
                    "--backbone",
                    str(backbone),
                    "--wheelhouse",
                    str(tmp_path / "nowhere"),
                ],
            )
        finally:
            run_fleet(hosts, "stop")
        home = fleet.hosts["pi-1"].home
    assert [r.outcome for r in first + again] == [Outcome.OK, Outcome.OK], [r.detail for r in first + again]
    assert "offline from 3 wheel(s) (3 copied)" in first[0].detail
    assert "offline from 3 wheel(s) (0 copied)" in again[0].detail  # unchanged wheels are not sent again
    copied = home / "ondevice" / "wheelhouse"
    for wheel in wheelhouse.iterdir():
        assert (copied / wheel.name).read_bytes() == wheel.read_bytes()
    pip_log = (home / "state" / "pip.log").read_text()
    assert f"--no-index --find-links {copied}" in pip_log
    assert cli.exit_code == 2 and "nowhere is not a folder" in cli.output, cli.output
