"""The fleet end to end with real processes: three stand-in Pis over real SSH are provisioned (a real venv,
a real offline pip install of the built wheel), their SuperNodes run under a stand-in service manager and
join a real SuperLink on loopback (TLS, node authentication), `flwr run` completes, `fleet status` shows
each device's true state, and a device killed mid-run does not hold up the later rounds. And every fleet
command (provision, status, logs, stop, start, restart) on SuperNodes that really run, stop and fail.

Every process started here is stopped here, by PID (the SuperLink's process group, each stand-in's
supervisor and SuperNode).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from process_standins import ProcessStandInFleet, alive
from typer.testing import CliRunner

import ondevice
import ondevice.cli.fleet  # registers the subcommand
from bench.flower_loopback import Cluster, free_port, make_node_key, make_tls
from devices.fleet import Bundle, Outcome, load_inventory, render_supernode_unit, run_fleet
from devices.fleet.bundle import build_wheel, find_backbones
from devices.testing.standin import StandInSpec
from ondevice.cli._app import app

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("deployment")]

NAMES = ("pi-a", "pi-b", "pi-c")
# Far above what a healthy run takes; a server that waited node-wait-s (600 s) for the killed device in
# every later round could not finish within it.
RUN_LIMIT_S = 480


def _journal(hosts) -> str:  # type: ignore[no-untyped-def]
    return run_fleet(hosts, "logs", log_lines=500)[0].stdout


def _wait_until(predicate, timeout_s: float, what: str, logs=lambda: "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout_s} s\n{logs()}")
        time.sleep(0.5)


@pytest.mark.timeout(900)
def test_provisioned_standins_run_a_federation_and_survive_a_dead_device(tmp_path: Path) -> None:
    backbones = tuple(p for p in find_backbones() if p.name.startswith("cnn-"))
    if not backbones:
        pytest.skip("no pretrained cnn backbone in this machine's cache (run tests/federated first)")
    wheel = build_wheel(tmp_path / "dist")
    bundle = Bundle(wheel=wheel, backbones=backbones)

    tls = make_tls(tmp_path)
    cluster = Cluster(tmp_path / "server", tls=tls)
    standins = ProcessStandInFleet(tmp_path / "fleet", [StandInSpec(name) for name in NAMES])

    def logs() -> str:
        parts = [cluster.logs()]
        for name in NAMES:
            log = tmp_path / "fleet" / name / "state" / "ondevice-supernode.log"
            if log.exists():
                parts.append(f"--- {name}\n" + log.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    try:
        cluster.start_superlink()
        standins.start()
        for name in NAMES:  # each Pi's key pair; the operator registers the public halves
            private, public = make_node_key(standins.hosts[name].home, "supernode.key")
            os.chmod(private, 0o600)
            out = cluster.flwr("supernode", "register", str(public), "local", "--format", "json")
            assert out.returncode == 0, out.stdout + out.stderr
        standins.set_fleet(superlink=f"127.0.0.1:{cluster.port}", root_certificates=str(tls["ca"]))
        hosts = load_inventory(standins.inventory_path).hosts

        provisioned = run_fleet(hosts, "provision", bundle=bundle, restart_wait_s=60.0, settle_s=3.0)
        assert [r.outcome for r in provisioned] == [Outcome.OK] * 3, [r.detail for r in provisioned]
        for name in NAMES:  # the wheel, really installed into the stand-in's venv, is what runs
            venv_python = standins.hosts[name].home / "ondevice" / "venv" / "bin" / "python"
            where = subprocess.run(
                [str(venv_python), "-c", "import ondevice, federated; print(ondevice.__file__)"],
                capture_output=True,
                text=True,
                check=True,
                cwd=tmp_path,
            ).stdout.strip()
            assert where.startswith(str(venv_python.parents[1])), where
        status = run_fleet(hosts, "status")
        assert {r.host: r.outcome for r in status} == dict.fromkeys(NAMES, Outcome.OK)
        assert all(r.detail == "active" for r in status)

        results = tmp_path / "results.json"
        run_id = cluster.run_app(
            f"rounds=4 results-path='{results}' min-nodes=3 node-wait-s=600.0 local-epochs=1 "
            "round-timeout-s=150.0 scheme='last_layer' lr=0.01"
        )

        def rounds_done() -> list[dict]:
            return json.loads(results.read_text())["rounds"] if results.exists() else []

        _wait_until(lambda: len(rounds_done()) >= 1, 300, "round 1", logs)
        victim = standins.supernode_pid("pi-c")
        assert victim is not None
        os.kill(victim, signal.SIGKILL)  # the SuperNode dies in round 2; its service manager restarts it
        state = standins.hosts["pi-c"].home / "state" / "ondevice-supernode.state"
        _wait_until(lambda: state.read_text().split()[0] == "activating", 30, "the restart wait", logs)
        status = {r.host: r for r in run_fleet(hosts, "status")}
        assert status["pi-a"].outcome is Outcome.OK and status["pi-b"].outcome is Outcome.OK
        assert status["pi-c"].outcome is Outcome.FAILED
        assert "activating (auto-restart)" in status["pi-c"].detail

        finished = cluster.wait_finished(run_id, timeout_s=RUN_LIMIT_S)
        assert finished == "finished:completed", logs()
        rounds = rounds_done()
        assert len(rounds) == 4 and all(r["accepted"] >= 2 for r in rounds), f"{rounds}\n{logs()}"
        # The dead device was missed once (the round it died in), never waited for again.
        missed = [(r["round"], node) for r in rounds for node, _ in r["rejected"]]
        assert len(missed) <= 1, f"{rounds}\n{logs()}"
        # The unit's restart policy brings the authenticated SuperNode back under its own node ID, once
        # the SuperLink has marked it offline (until then it is refused: exit code 305).
        _wait_until(
            lambda: run_fleet(hosts[2:], "status")[0].ok and standins.supernode_pid("pi-c") is not None,
            180,
            "pi-c running again",
            logs,
        )
        journal = run_fleet(hosts, "logs", log_lines=500)
        assert all(r.outcome is Outcome.OK for r in journal)
        text = next(r for r in journal if r.host == "pi-c").stdout
        assert "exited with status -9" in text
        _wait_until(
            lambda: len(re.findall(r"SuperNode ID: (\d+)", _journal(hosts[2:]))) >= 2, 60, "rejoin", logs
        )
        first, again = re.findall(r"SuperNode ID: (\d+)", _journal(hosts[2:]))[:2]
        assert first == again
    finally:
        standins.stop_services()
        cluster.stop_all()
        standins.close()


@pytest.mark.timeout(600)
def test_fleet_commands_drive_real_supernodes(tmp_path: Path) -> None:
    """provision, status, logs, stop, start, restart and a broken unit, on SuperNodes that really run.

    No SuperLink listens at the inventory's address, so each SuperNode keeps trying to connect, as a Pi's
    does while its server is down: the unit runs, and its journal is the SuperNode's own output.
    """
    wheel = build_wheel(tmp_path / "dist")
    backbone = tmp_path / "cnn-0123abcd.safetensors"
    backbone.write_bytes(bytes(range(256)) * 4)
    bundle = Bundle(wheel=wheel, backbones=(backbone,))
    tls = make_tls(tmp_path)
    names = ("pi-1", "pi-2")
    standins = ProcessStandInFleet(tmp_path / "fleet", [StandInSpec(name) for name in names])

    def logs() -> str:
        return "\n".join(
            f"--- {name}\n" + path.read_text(errors="replace")[-2000:]
            for name in names
            if (path := standins.hosts[name].home / "state" / "ondevice-supernode.log").exists()
        )

    try:
        standins.start()
        for name in names:
            private, _ = make_node_key(standins.hosts[name].home, "supernode.key")
            os.chmod(private, 0o600)
        standins.set_fleet(superlink=f"127.0.0.1:{free_port()}", root_certificates=str(tls["ca"]))
        hosts = load_inventory(standins.inventory_path).hosts

        provisioned = run_fleet(hosts, "provision", bundle=bundle, restart_wait_s=60.0, settle_s=3.0)
        assert [r.outcome for r in provisioned] == [Outcome.OK] * 2, [r.detail for r in provisioned]
        assert provisioned[0].detail.startswith(f"ondevice {ondevice.__version__}, flwr==1.41.*, 1 backbone")
        for host in hosts:
            home = standins.hosts[host.name].home
            root = home / "ondevice"
            assert (home / "systemd" / "ondevice-supernode.service").read_text() == render_supernode_unit(
                host
            )
            assert (root / "dist" / wheel.name).read_bytes() == wheel.read_bytes()
            assert (root / "cache" / "pretrained" / backbone.name).read_bytes() == backbone.read_bytes()
            assert "dialout" in (home / "state" / "usermod.log").read_text()
            assert (home / "state" / "ondevice-supernode.enabled").exists()
        pids = {name: standins.supernode_pid(name) for name in names}
        assert None not in pids.values(), logs()

        status = run_fleet(hosts, "status")
        assert [(r.outcome, r.detail) for r in status] == [(Outcome.OK, "active")] * 2
        journal = run_fleet(hosts, "logs", log_lines=200)
        assert all("Starting Flower SuperNode" in r.stdout for r in journal), logs()

        stopped = run_fleet(hosts, "stop")
        assert [r.detail for r in stopped] == ["inactive", "inactive"]
        assert all(standins.supernode_pid(name) is None for name in names)  # the processes are gone
        assert all(not alive(pid) for pid in pids.values() if pid is not None)
        assert [r.outcome for r in run_fleet(hosts, "status")] == [Outcome.FAILED] * 2

        started = run_fleet(hosts, "start", restart_wait_s=60.0, settle_s=3.0)
        assert [r.outcome for r in started] == [Outcome.OK] * 2, [r.detail for r in started]
        again = {name: standins.supernode_pid(name) for name in names}
        assert None not in again.values() and not set(again.values()) & set(pids.values())
        restarted = run_fleet(hosts, "restart", restart_wait_s=60.0, settle_s=3.0)
        assert [r.outcome for r in restarted] == [Outcome.OK] * 2, [r.detail for r in restarted]
        after = {name: standins.supernode_pid(name) for name in names}
        assert None not in after.values() and not set(after.values()) & set(again.values())

        # pi-2 loses its authentication key: its SuperNode really exits, the service manager waits
        # RestartSec before the next try, and the fleet reports pi-2 as failed, with where to look.
        (standins.hosts["pi-2"].home / "supernode.key").unlink()
        victim = after["pi-2"]
        assert victim is not None
        os.kill(victim, signal.SIGTERM)
        state = standins.hosts["pi-2"].home / "state" / "ondevice-supernode.state"
        _wait_until(
            lambda: "exited with status 1" in _journal(hosts[1:]), 120, "pi-2's SuperNode failing", logs
        )
        _wait_until(lambda: state.read_text().split()[0] == "activating", 30, "the restart wait", logs)
        status = {r.host: r for r in run_fleet(hosts, "status")}
        assert status["pi-1"].outcome is Outcome.OK and status["pi-2"].outcome is Outcome.FAILED
        assert "activating (auto-restart)" in status["pi-2"].detail
        assert "fleet logs --hosts pi-2" in status["pi-2"].detail
        assert "No such file or directory" in _journal(hosts[1:])
        cli = CliRunner().invoke(app, ["fleet", "status", "-i", str(standins.inventory_path)])
        assert cli.exit_code == 1 and "1 ok, 1 failed" in cli.output, cli.output
    finally:
        standins.stop_services()
        standins.close()
