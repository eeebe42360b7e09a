"""The programs behind :mod:`process_standins`' ``python3 -m venv``, ``systemctl`` and ``journalctl``.

Run inside a stand-in Pi (cwd = its home, ``$FAKE_STATE`` = its state folder, ``$HOME`` = its home):

    process_standin_supervisor.py make-venv DIR SITE_PACKAGES_LIST
    process_standin_supervisor.py systemctl {daemon-reload|enable|start|restart|stop|show} [...] UNIT
    process_standin_supervisor.py journalctl -u UNIT -n N --no-pager
    process_standin_supervisor.py supervise UNIT      (started by `systemctl start`, detached)

A test double: it lives with the tests, never in the installed packages.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

STATE = Path(os.environ.get("FAKE_STATE", "."))
HOME = Path(os.environ.get("HOME", "."))
ENTRY_SCRIPTS = ("flwr", "flwr-clientapp", "flower-supernode", "flower-superexec")


# -- python3 -m venv ----------------------------------------------------------------------------------
def make_venv(target: str, sites: str) -> int:
    venv = Path(target)
    done = subprocess.run([sys.executable, "-m", "venv", str(venv)], check=False)
    if done.returncode != 0:
        return done.returncode
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    host_paths = Path(sites).read_text()
    # After the venv's own site-packages: the wheel pip installs into the venv comes first.
    (Path(purelib) / "_standin_host_packages.pth").write_text(host_paths)
    # ensurepip's old setuptools would hide this machine's (torch needs a newer one, and pip is offline)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "setuptools"], check=False)
    (venv / "pip.conf").write_text("[global]\nno-index = true\ndisable-pip-version-check = true\n")
    host_bin = Path(sysconfig.get_path("scripts"))
    for name in ENTRY_SCRIPTS:
        source = (host_bin / name).read_text().splitlines()
        script = venv / "bin" / name
        script.write_text("\n".join([f"#!{python}", *source[1:]]) + "\n")
        script.chmod(0o755)
    return 0


# -- the unit file ------------------------------------------------------------------------------------
def _unit_file(unit: str) -> Path:
    for folder in (HOME / "systemd", Path("/etc/systemd/system")):
        path = folder / f"{unit}.service"
        if path.exists():
            return path
    raise SystemExit(f"stand-in systemctl: unit {unit}.service not found in {HOME / 'systemd'}")


def _systemd_split(value: str) -> list[str]:
    """Split an ExecStart= line as systemd does for what the fleet writes: shell-like quotes, %% and $$."""
    return [part.replace("%%", "%").replace("$$", "$") for part in shlex.split(value)]


def _read_unit(unit: str) -> tuple[list[str], dict[str, str], str, float]:
    command: list[str] = []
    env: dict[str, str] = {}
    cwd = str(HOME)
    restart_s = 0.1
    for line in _unit_file(unit).read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "ExecStart":
            command = _systemd_split(value)
        elif key == "Environment":
            for item in _systemd_split(value):
                name, _, val = item.partition("=")
                env[name] = val
        elif key == "WorkingDirectory":
            cwd = _systemd_split(value)[0]
        elif key == "RestartSec":
            restart_s = float(re.sub(r"s$", "", value.strip()))
    if not command:
        raise SystemExit(f"stand-in systemctl: {unit}.service has no ExecStart")
    return command, env, cwd, restart_s


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the supervisor -----------------------------------------------------------------------------------
def _write_state(unit: str, active: str, sub: str) -> None:
    tmp = STATE / f"{unit}.state.tmp"
    tmp.write_text(f"{active} {sub}\n")
    os.replace(tmp, STATE / f"{unit}.state")


def supervise(unit: str) -> int:
    """Run the unit's ExecStart; restart it after RestartSec whatever the exit (Restart=always)."""
    command, env, cwd, restart_s = _read_unit(unit)
    environment = {**os.environ, **env}
    environment.pop("FAKE_STATE", None)
    if "--port" not in command:  # three stand-ins share one loopback; a Pi's 9094 is its own
        command += ["--port", str(_free_port())]
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    log = open(STATE / f"{unit}.log", "ab", buffering=0)  # noqa: SIM115 - open while supervising
    while not stopping:
        _write_state(unit, "active", "running")
        child = subprocess.Popen(command, env=environment, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        (STATE / f"{unit}.child").write_text(str(child.pid))
        code = child.wait()
        log.write(f"stand-in systemd: {unit} exited with status {code}\n".encode())
        if stopping:
            break
        _write_state(unit, "activating", "auto-restart")
        deadline = time.monotonic() + restart_s
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
    _write_state(unit, "inactive", "dead")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _supervisor_pid(unit: str) -> int | None:
    try:
        pid = int((STATE / f"{unit}.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _stop(unit: str) -> None:
    pid = _supervisor_pid(unit)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
        _write_state(unit, "failed", "timeout")


def _start(unit: str) -> None:
    if _supervisor_pid(unit) is not None:
        return
    _read_unit(unit)  # a unit that cannot start fails here, as systemctl would
    proc = subprocess.Popen(
        [sys.executable, __file__, "supervise", unit],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(STATE / f"{unit}.supervisor.log", "ab"),  # noqa: SIM115 - the child owns it
        env=os.environ,
    )
    (STATE / f"{unit}.pid").write_text(str(proc.pid))


def systemctl(args: list[str]) -> int:
    if not args:
        print("stand-in systemctl: no command", file=sys.stderr)
        return 1
    command, rest = args[0], [a for a in args[1:] if not a.startswith("--")]
    if command == "daemon-reload":
        return 0
    unit = rest[-1].removesuffix(".service") if rest else ""
    if command == "enable":
        (STATE / f"{unit}.enabled").touch()
    elif command == "start":
        _start(unit)
    elif command == "restart":
        _stop(unit)
        _start(unit)
    elif command == "stop":
        _stop(unit)
    elif command == "show":
        pid = _supervisor_pid(unit)
        path = STATE / f"{unit}.state"
        active, sub = path.read_text().split() if path.exists() else ("inactive", "dead")
        if pid is None and active != "inactive":
            active, sub = "failed", "killed"  # the supervisor is gone: nothing runs the unit
        print(f"ActiveState={active}\nSubState={sub}")
    else:
        print(f"stand-in systemctl: unknown command {command}", file=sys.stderr)
        return 1
    return 0


def journalctl(args: list[str]) -> int:
    unit, lines = "", 10
    for i, arg in enumerate(args):
        if arg == "-u":
            unit = args[i + 1]
        elif arg == "-n":
            lines = int(args[i + 1])
    path = STATE / f"{unit.removesuffix('.service')}.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    for line in text.splitlines()[-lines:]:
        print(line)
    return 0


def main(argv: list[str]) -> int:
    what, rest = argv[0], argv[1:]
    if what == "make-venv":
        return make_venv(rest[0], rest[1])
    if what == "systemctl":
        return systemctl(rest)
    if what == "journalctl":
        return journalctl(rest)
    if what == "supervise":
        return supervise(rest[0])
    print(f"stand-in: unknown program {what}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
