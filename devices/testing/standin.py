"""Stand-in Raspberry Pis on loopback: real SSH servers (asyncssh) for demos and tests.

Each stand-in is an asyncssh server on ``127.0.0.1`` and a free port, with its own host key. It runs
every command it is sent through ``/bin/sh`` in its own home directory, with fake ``uname``,
``python3``, ``sudo``, ``usermod``, ``systemctl`` and ``journalctl`` first on ``PATH`` (shell scripts
that keep the unit's state in files), and serves SFTP, so provisioning's copies and systemd control run
for real but touch nothing outside that directory. The fake venv's ``pip`` only logs what it is asked
to install and its ``python`` imports ``ondevice`` only once a wheel was "installed": nothing is really
installed or started. They are for rehearsing the commands in seconds (``examples/fleet/walkthrough.py``)
and for what crosses SSH and SFTP (host keys, refused keys, silent and down hosts, per-host outcomes);
what the commands do on a Pi is tested with ``tests/devices/process_standins.py``, which keeps these
SSH servers and replaces the stubs by a real venv, a real offline ``pip install`` and a service manager
that runs the unit's ``flower-supernode``. :class:`StandInFleet` starts
several in a background event loop, writes a client key, a ``known_hosts`` file and an inventory, and
can add a host that is down (closed port), one that refuses the client key, one whose host key does not
match ``known_hosts`` and one that accepts TCP connections but never speaks (``silent``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["StandIn", "StandInFleet", "StandInSpec"]

_FAKE_BIN: dict[str, str] = {
    "uname": 'if [ "$1" = "-m" ]; then echo "$FAKE_MACHINE"; else echo Linux; fi\n',
    "python3": """if [ "$1" = "-c" ]; then echo "$FAKE_PYTHON"; exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  printf '#!/bin/sh\\necho "pip $*" >> "%s/pip.log"\\necho "Successfully installed"\\n' "$FAKE_STATE" \\
    > "$3/bin/pip"
  cat > "$3/bin/python" <<'PY'
#!/bin/sh
if grep -q 'whl' "$FAKE_STATE/pip.log" 2>/dev/null; then echo "ondevice 0+standin"; exit 0; fi
echo "ModuleNotFoundError: No module named 'ondevice'" >&2; exit 1
PY
  chmod +x "$3/bin/pip" "$3/bin/python"
  exit 0
fi
echo "stand-in python3: unsupported arguments: $*" >&2; exit 2
""",
    "sudo": 'if [ "$1" = "-n" ]; then shift; fi\nexec "$@"\n',
    "usermod": 'echo "usermod $*" >> "$FAKE_STATE/usermod.log"\n',
    "systemctl": """cmd="$1"; shift
unit="$1"
echo "systemctl $cmd $*" >> "$FAKE_STATE/systemctl.log"
case "$cmd" in
  daemon-reload) ;;
  enable) touch "$FAKE_STATE/$unit.enabled" ;;
  start|restart)
    if [ -f "$FAKE_STATE/broken" ]; then echo failed > "$FAKE_STATE/$unit.state"
    else echo active > "$FAKE_STATE/$unit.state"; fi ;;
  stop) echo inactive > "$FAKE_STATE/$unit.state" ;;
  show)
    unit="$2"
    state=$(cat "$FAKE_STATE/$unit.state" 2>/dev/null || echo inactive)
    case "$state" in active) sub=running ;; failed) sub=failed ;; *) sub=dead ;; esac
    printf 'ActiveState=%s\nSubState=%s\n' "$state" "$sub" ;;
  *) echo "stand-in systemctl: unknown command $cmd" >&2; exit 1 ;;
esac
""",
    "journalctl": """n=10
while [ $# -gt 0 ]; do case "$1" in -n) n="$2"; shift ;; esac; shift; done
i=1
while [ "$i" -le "$n" ]; do echo "$FAKE_NAME flower-supernode[4242]: log line $i"; i=$((i + 1)); done
""",
}


@dataclass(frozen=True)
class StandInSpec:
    """One stand-in host: healthy, down, refusing the client key, showing a wrong host key, or silent."""

    name: str
    mode: Literal["ok", "down", "refuse-key", "wrong-host-key", "silent"] = "ok"
    machine: str = "aarch64"
    python_version: str = "3.11.2"


@dataclass
class StandIn:
    """A running (or deliberately down) stand-in."""

    spec: StandInSpec
    port: int
    home: Path
    server: Any = None

    def state(self, service: str = "ondevice-supernode") -> str:
        """The unit state the fake systemctl holds."""
        path = self.home / "state" / f"{service}.state"
        return path.read_text().strip() if path.exists() else "inactive"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class StandInFleet:
    """Several stand-in Pis serving on loopback from a background event loop; use it as a context manager.

    After ``start()``: ``client_key`` (private key path), ``known_hosts`` and ``inventory_path`` (TOML
    listing every stand-in, including the broken ones) are written under ``workdir``.
    """

    workdir: Path
    specs: list[StandInSpec]
    fleet_settings: dict[str, Any] = field(default_factory=dict)
    hosts: dict[str, StandIn] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.client_key = self.workdir / "client_key"
        self.known_hosts = self.workdir / "known_hosts"
        self.inventory_path = self.workdir / "inventory.toml"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="standin-ssh", daemon=True)

    def _write_fake_bin(self) -> Path:
        bin_dir = self.workdir / "fakebin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for name, body in _FAKE_BIN.items():
            path = bin_dir / name
            path.write_text("#!/bin/sh\n" + body)
            path.chmod(0o755)
        return bin_dir

    async def _start(self) -> None:
        import asyncssh

        self.workdir.mkdir(parents=True, exist_ok=True)
        client = asyncssh.generate_private_key("ssh-ed25519")
        client.write_private_key(str(self.client_key))
        client.write_public_key(str(self.client_key) + ".pub")
        os.chmod(self.client_key, 0o600)
        stranger = asyncssh.generate_private_key("ssh-ed25519")
        bin_dir = self._write_fake_bin()
        known_lines = []
        for spec in self.specs:
            home = self.workdir / spec.name
            (home / "state").mkdir(parents=True, exist_ok=True)
            (home / "systemd").mkdir(exist_ok=True)  # stands in for /etc/systemd/system
            if spec.mode == "down":
                self.hosts[spec.name] = StandIn(spec, _free_port(), home)
                continue
            if spec.mode == "silent":  # accepts TCP, never sends an SSH greeting (a hung sshd, a wrong port)
                silent = await asyncio.start_server(_hold_silently, "127.0.0.1", 0)
                port = int(silent.sockets[0].getsockname()[1])
                self.hosts[spec.name] = StandIn(spec, port, home, silent)
                continue
            host_key = asyncssh.generate_private_key("ssh-ed25519")
            authorized = stranger if spec.mode == "refuse-key" else client
            env = {
                "PATH": f"{bin_dir}:/usr/bin:/bin",
                "HOME": str(home),
                "FAKE_STATE": str(home / "state"),
                "FAKE_MACHINE": spec.machine,
                "FAKE_PYTHON": spec.python_version,
                "FAKE_NAME": spec.name,
                "LC_ALL": "C",
            }
            server = await asyncssh.listen(
                "127.0.0.1",
                0,
                server_host_keys=[host_key],
                authorized_client_keys=asyncssh.import_authorized_keys(
                    authorized.export_public_key().decode()
                ),
                process_factory=_process_factory(home, env),
                sftp_factory=True,
                reuse_address=True,
            )
            port = server.get_port()
            self.hosts[spec.name] = StandIn(spec, port, home, server)
            shown = (
                asyncssh.generate_private_key("ssh-ed25519") if spec.mode == "wrong-host-key" else host_key
            )
            known_lines.append(f"[127.0.0.1]:{port} " + shown.export_public_key().decode().strip())
        self.known_hosts.write_text("\n".join(known_lines) + "\n")
        self.inventory_path.write_text(self.inventory_toml())

    def inventory_toml(self) -> str:
        """An inventory for these stand-ins (remote paths inside each stand-in's home)."""
        lines = [
            "[fleet]",
            'user = "pi"',
            f'key = "{self.client_key}"',
            f'known_hosts = "{self.known_hosts}"',
            'superlink = "127.0.0.1:8000"',
            'root_certificates = "/etc/flower/ca.crt"',
            'profile = "rpi-4b-4gb"',
            "connect_timeout_s = 5",
        ]
        for key, value in self.fleet_settings.items():
            lines.append(f"{key} = {_toml_value(value)}")
        for index, (name, standin) in enumerate(self.hosts.items()):
            lines += [
                "",
                "[[hosts]]",
                f'name = "{name}"',
                'address = "127.0.0.1"',
                f"port = {standin.port}",
                f'remote_dir = "{standin.home}/ondevice"',
                f'unit_dir = "{standin.home}/systemd"',
                f'auth_key = "{standin.home}/supernode.key"',
                f"node = {{ partition_id = {index}, num_partitions = {len(self.hosts)} }}",
            ]
            if standin.spec.mode == "silent":
                lines.append("connect_timeout_s = 1")
        return "\n".join(lines) + "\n"

    def start(self) -> StandInFleet:
        """Start the servers; returns self."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=60)
        return self

    def close(self) -> None:
        """Stop every server and the background loop."""

        async def stop() -> None:
            for standin in self.hosts.values():
                if standin.server is not None:
                    standin.server.close()
                    with contextlib.suppress(Exception):
                        await standin.server.wait_closed()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> StandInFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


async def _hold_silently(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read and discard until the client gives up; never write a byte."""
    with contextlib.suppress(Exception):
        while await reader.read(4096):
            pass
    writer.close()


def _process_factory(home: Path, env: dict[str, str]) -> Any:
    async def handle(process: Any) -> None:
        command = process.command
        if not command:
            process.stderr.write("stand-in: interactive shells are not supported\n")
            process.exit(1)
            return
        child = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            command,
            cwd=str(home),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await child.communicate()
        process.stdout.write(out.decode("utf-8", "replace"))
        process.stderr.write(err.decode("utf-8", "replace"))
        process.exit(child.returncode if child.returncode is not None else 255)

    return handle
