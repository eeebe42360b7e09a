"""Ctrl-C ends a long command promptly, prints what was done so far and exits with status 130.

Each test runs the installed console script in its own session, waits until the command reports real
progress, then sends SIGINT to the whole process group, as a terminal's Ctrl-C does (Ray's workers and
SSH connections included). No timing is asserted: the process must end on its own with 130.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXE = Path(sys.executable).parent / "ondevice"
SMALL_LR = {"name": "lite_residual", "expand": 0.125, "kernel_size": 3, "groups": 4, "downsample": 1}


def _env(tmp_path: Path) -> dict[str, str]:
    # tests/federated would shadow the federated package on a PYTHONPATH a Ray session left behind.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        COLUMNS="200",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_HOME=str(tmp_path / "flwr"),
    )
    return env


def _default_sigint() -> None:
    """In the child: Ctrl-C's default disposition, even when this test runs with SIGINT ignored.

    A shell starts background jobs with SIGINT ignored and children inherit that, so the command would never
    see the signal; a terminal user's command has the default disposition, which this restores.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_after(args: list[str], ready: str, tmp_path: Path) -> tuple[int, str, list[str]]:
    """Run ``ondevice ARGS``; Ctrl-C it once a stderr line holds ``ready``. Returns rc, stdout, stderr."""
    proc = subprocess.Popen(
        [str(EXE), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path),
        cwd=tmp_path,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )
    lines: list[str] = []
    sent = False
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if not sent and ready in line:
                os.killpg(proc.pid, signal.SIGINT)
                sent = True
        out = proc.stdout.read() if proc.stdout is not None else ""
        rc = proc.wait(timeout=600)  # a safety net for a hung child, not a timing assertion
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert sent, f"never saw {ready!r} before the command ended:\n{''.join(lines)}"
    return rc, out, lines


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.xdist_group("flower")
def test_ctrl_c_stops_simulate_and_prints_the_rounds_so_far(tmp_path: Path) -> None:
    rounds = 40
    args = ["simulate", "--clients", "2", "--rounds", str(rounds), "--local-epochs", "1"]
    args += ["--partition", "iid", "--scheme", json.dumps(SMALL_LR)]
    rc, out, lines = _interrupt_after(args, f"round 1/{rounds}:", tmp_path)
    text = "".join(lines)
    assert rc == 130, text
    assert out == ""
    done = [line for line in lines if line.startswith("round ")]
    assert 1 <= len(done) < rounds, text
    assert f"stopped after {len(done)} of {rounds} rounds (Ctrl-C)" in text
    assert f"{len(done)} of {rounds} rounds" in text and "final accuracy 0." in text  # the summary table
    assert "Traceback" not in text


@pytest.mark.slow
@pytest.mark.integration
def test_ctrl_c_stops_transfer_and_prints_the_schemes_so_far(tmp_path: Path) -> None:
    schemes = "full,last_layer,bias,lite_residual,sparse"
    rc, out, lines = _interrupt_after(
        ["transfer", "--schemes", schemes, "--epochs", "15"], "full: accuracy", tmp_path
    )
    text = "".join(lines)
    assert rc == 130, text
    assert out == ""
    # dict.fromkeys: a line announced while the progress bar is live can be echoed again when Ctrl-C tears
    # the bar down (cosmetic, see the stop 11 note); what counts is which schemes finished.
    finished = list(dict.fromkeys(line.split(":")[0].strip() for line in lines if ": accuracy" in line))
    assert finished[0] == "full" and len(finished) < 5, text
    assert f"interrupted: {len(finished)} of 5 schemes finished (full" in text
    assert "Traceback" not in text


@pytest.mark.integration
def test_ctrl_c_stops_a_fleet_command_waiting_on_a_host(tmp_path: Path) -> None:
    """A host that accepts the TCP connection and never speaks SSH: the command waits on it until Ctrl-C."""
    asyncssh = pytest.importorskip("asyncssh")
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(tmp_path / "id_ed25519"))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        (tmp_path / "known_hosts").write_text("")
        (tmp_path / "fleet.toml").write_text(
            f'[fleet]\nknown_hosts = "known_hosts"\nkey = "id_ed25519"\n\n[[hosts]]\nname = "pi-silent"\n'
            f'address = "127.0.0.1"\nport = {port}\nconnect_timeout_s = 600\n'  # only Ctrl-C ends the wait
        )
        proc = subprocess.Popen(
            [str(EXE), "fleet", "check", "--inventory", "fleet.toml"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(tmp_path),
            cwd=tmp_path,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
        try:
            while not select.select([server], [], [], 1.0)[0]:  # until the command connects
                assert proc.poll() is None, proc.communicate()[1]  # it ended without connecting
            connection, _ = server.accept()  # the command is now waiting for the host's SSH banner
            with connection:
                os.killpg(proc.pid, signal.SIGINT)
                out, err = proc.communicate(timeout=600)  # a safety net, not a timing assertion
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 130, err
    assert out == ""
    assert "interrupted: fleet check stopped" in " ".join(err.split())
    assert "Traceback" not in err
