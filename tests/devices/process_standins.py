"""Stand-in Pis that run the real thing: a real venv, a real offline pip install, a real SuperNode.

:class:`ProcessStandInFleet` keeps the SSH servers of :class:`devices.testing.standin.StandInFleet` (real
asyncssh, SFTP, every command through ``/bin/sh`` in the stand-in's home) and replaces its shell stubs by
programs that do the work:

- ``python3`` is this machine's Python. ``python3 -m venv DIR`` makes a real venv; so that torch and flwr
  need not be downloaded, the venv sees this project's site-packages (a ``.pth`` line, after its own
  site-packages, so the wheel installed into the venv wins over the checkout), gets the ``flwr`` and
  ``flower-*`` entry scripts pointing at its own interpreter (what ``pip install flwr`` would write) and a
  ``pip.conf`` with ``no-index = true``: every ``pip install`` on a stand-in is offline, and the ondevice
  wheel provisioning copied is really installed into the venv.
- ``systemctl`` is a small service manager: ``start``/``restart`` read the unit file provisioning wrote
  and run its ``ExecStart`` (``flower-supernode``) with the unit's ``Environment=`` and
  ``WorkingDirectory=`` under a supervisor process that applies ``Restart=always`` and ``RestartSec=``;
  ``show`` reports the real state (``active (running)`` while the SuperNode process lives,
  ``activating (auto-restart)`` while it waits to restart it, ``inactive (dead)`` after ``stop``,
  ``failed`` when the supervisor itself is gone); ``stop`` ends it by PID. Three stand-ins share one
  loopback, so it gives each SuperNode its own ``--port`` for its local runtime API (on a Pi, the default
  9094 is free).
- ``journalctl -u UNIT -n N`` prints the last lines of the SuperNode's real output.

Every process is started in its own process group with its PID in the stand-in's ``state/`` folder;
:meth:`ProcessStandInFleet.stop_services` ends them all by those PIDs.
"""

from __future__ import annotations

import os
import signal
import site
import sys
import time
from pathlib import Path

from devices.testing.standin import StandInFleet

HERE = Path(__file__).resolve().parent
SUPERVISOR = HERE / "process_standin_supervisor.py"

_PYTHON3 = """#!/bin/sh
# Stand-in python3: this machine's Python; `-m venv DIR` makes a real venv that sees this project's packages.
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  exec "{python}" "{supervisor}" make-venv "$3" "{sites}"
fi
exec "{python}" "$@"
"""

_SYSTEMCTL = """#!/bin/sh
echo "systemctl $*" >> "$FAKE_STATE/systemctl.log"
exec "{python}" "{supervisor}" systemctl "$@"
"""

_JOURNALCTL = """#!/bin/sh
exec "{python}" "{supervisor}" journalctl "$@"
"""

_UNAME = (
    'if [ "$1" = "-m" ]; then uname_real=$(/bin/uname -m); echo "$uname_real"; else /bin/uname "$@"; fi\n'
)


class ProcessStandInFleet(StandInFleet):
    """Stand-in Pis whose venv, pip and service manager are real (see the module docstring)."""

    def _write_fake_bin(self) -> Path:
        bin_dir = self.workdir / "procbin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        python = sys.executable
        scripts = {
            "python3": _PYTHON3.format(
                python=python, supervisor=SUPERVISOR, sites=bin_dir / "host-site-packages"
            ),
            "systemctl": _SYSTEMCTL.format(python=python, supervisor=SUPERVISOR),
            "journalctl": _JOURNALCTL.format(python=python, supervisor=SUPERVISOR),
            "sudo": '#!/bin/sh\nif [ "$1" = "-n" ]; then shift; fi\nexec "$@"\n',
            "usermod": '#!/bin/sh\necho "usermod $*" >> "$FAKE_STATE/usermod.log"\n',
            "uname": "#!/bin/sh\n" + _UNAME,
        }
        for name, body in scripts.items():
            path = bin_dir / name
            path.write_text(body)
            path.chmod(0o755)
        (bin_dir / "host-site-packages").write_text("\n".join(site.getsitepackages()) + "\n")
        return bin_dir

    def set_fleet(self, **settings: object) -> None:
        """Rewrite the inventory with these ``[fleet]`` settings (e.g. the SuperLink's real address)."""
        lines = self.inventory_toml().splitlines()
        for key, value in settings.items():
            rendered = f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}"
            for i, line in enumerate(lines):
                if line.startswith(f"{key} = "):
                    lines[i] = rendered
                    break
            else:
                lines.insert(1, rendered)
        self.inventory_path.write_text("\n".join(lines) + "\n")

    def supernode_pid(self, name: str, service: str = "ondevice-supernode") -> int | None:
        """The PID of the SuperNode process the stand-in ``name`` runs now (None when none runs)."""
        path = self.hosts[name].home / "state" / f"{service}.child"
        try:
            pid = int(path.read_text())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None

    def stop_services(self, service: str = "ondevice-supernode", timeout_s: float = 20.0) -> None:
        """End every supervisor (and its SuperNode's process group) these stand-ins started, by PID."""
        for standin in self.hosts.values():
            state = standin.home / "state"
            for suffix in ("child", "pid"):
                path = state / f"{service}.{suffix}"
                try:
                    pid = int(path.read_text())
                except (OSError, ValueError):
                    continue
                if alive(pid):
                    try:
                        os.killpg(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        continue
                    deadline = time.monotonic() + timeout_s
                    while alive(pid) and time.monotonic() < deadline:
                        time.sleep(0.2)
                    if alive(pid):
                        os.killpg(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
