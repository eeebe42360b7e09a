"""Run a fleet action on many Pis over SSH (asyncssh), concurrently, with one precise result per host.

``check`` verifies a 64-bit OS and Python >= 3.11; ``provision`` creates a venv with pinned Flower and
torch and installs the SuperNode unit; ``start``/``stop``/``status`` drive systemd; ``restart`` is
rolling (one host at a time, waiting until the unit is ``active`` before the next; a host that does not
come back stops the roll-out, and the rest are reported ``skipped``); ``logs`` tails the journal.
A host that is unreachable, refuses the key, presents an unknown host key, exits non-zero or times out
is reported as such and never stops the other hosts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from devices.fleet.inventory import Host
from devices.fleet.remote import (
    MIN_PYTHON,
    SUPPORTED_MACHINES,
    check_script,
    logs_script,
    provision_script,
    systemctl_script,
    unit_path,
)

__all__ = ["Action", "HostResult", "Outcome", "run_action", "run_fleet"]

logger = logging.getLogger(__name__)


class Action(StrEnum):
    """What to do on each host."""

    CHECK = "check"
    PROVISION = "provision"
    START = "start"
    STOP = "stop"
    RESTART = "restart"
    STATUS = "status"
    LOGS = "logs"


class Outcome(StrEnum):
    """How an action ended on one host."""

    OK = "ok"
    FAILED = "failed"
    UNREACHABLE = "unreachable"
    AUTH_REFUSED = "auth-refused"
    HOST_KEY_MISMATCH = "host-key-mismatch"
    TIMEOUT = "timeout"
    ERROR = "error"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class HostResult:
    """One host's result: the outcome, a one-line explanation, and the command's output."""

    host: str
    action: Action
    outcome: Outcome
    detail: str
    exit_status: int | None = None
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether the action succeeded on this host."""
        return self.outcome is Outcome.OK

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        data = asdict(self)
        data["action"] = self.action.value
        data["outcome"] = self.outcome.value
        data["ok"] = self.ok
        return data


class _HostFailureError(Exception):
    def __init__(self, outcome: Outcome, detail: str) -> None:
        self.outcome = outcome
        self.detail = detail
        super().__init__(detail)


def _classify(host: Host, error: BaseException) -> _HostFailureError:
    import asyncssh

    where = f"{host.address}:{host.port}"
    if isinstance(error, _HostFailureError):
        return error
    if isinstance(error, asyncssh.HostKeyNotVerifiable):
        return _HostFailureError(
            Outcome.HOST_KEY_MISMATCH,
            f"host key of {where} is not the one in {host.known_hosts} ({error.reason}); if the Pi was "
            f"reinstalled, check its new key and replace the entry (ssh-keygen -R '[{host.address}]:"
            f"{host.port}' -f {host.known_hosts})",
        )
    if isinstance(error, asyncssh.PermissionDenied):
        return _HostFailureError(
            Outcome.AUTH_REFUSED,
            f"{host.user}@{where} refused the key {host.key}; append {host.key}.pub to "
            f"~{host.user}/.ssh/authorized_keys on the Pi",
        )
    if isinstance(error, asyncio.TimeoutError | TimeoutError):
        return _HostFailureError(Outcome.TIMEOUT, f"{where} did not answer in time ({error or 'timeout'})")
    if isinstance(error, ConnectionRefusedError):
        return _HostFailureError(Outcome.UNREACHABLE, f"connection refused at {where} (is sshd running?)")
    if isinstance(error, asyncssh.DisconnectError):
        return _HostFailureError(Outcome.ERROR, f"{where} disconnected: {error.reason}")
    if isinstance(error, OSError):
        return _HostFailureError(Outcome.UNREACHABLE, f"cannot reach {where}: {error.strerror or error}")
    return _HostFailureError(Outcome.ERROR, f"{type(error).__name__}: {error}")


async def _connect(host: Host) -> Any:
    import asyncssh

    if not host.key.exists():
        raise _HostFailureError(
            Outcome.ERROR, f"client key {host.key} does not exist (inventory field 'key')"
        )
    if host.insecure_ignore_host_keys:
        known_hosts = None
        logger.warning("%s: host key NOT verified (insecure_ignore_host_keys = true)", host.name)
    else:
        if not host.known_hosts.exists():
            raise _HostFailureError(
                Outcome.ERROR,
                f"known_hosts file {host.known_hosts} does not exist (inventory field 'known_hosts'); "
                f"add the Pi's host key to it, e.g. after checking it with ssh-keyscan -p {host.port} "
                f"{host.address}",
            )
        known_hosts = str(host.known_hosts)
    return await asyncio.wait_for(
        asyncssh.connect(
            host.address,
            port=host.port,
            username=host.user,
            client_keys=[str(host.key)],
            known_hosts=known_hosts,
            agent_path=None,
            config=[],
            preferred_auth="publickey",
            connect_timeout=host.connect_timeout_s,
        ),
        timeout=host.connect_timeout_s + 1,
    )


async def _run(conn: Any, host: Host, script: str, timeout_s: float | None = None) -> Any:
    return await conn.run(script, check=False, timeout=timeout_s or host.command_timeout_s)


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-lines:])


def _exit_failure(what: str, completed: Any) -> _HostFailureError:
    return _HostFailureError(
        Outcome.FAILED,
        f"{what} exited with status {completed.exit_status}: {_tail(completed.stderr or completed.stdout)}",
    )


async def _perform(
    conn: Any, host: Host, action: Action, *, log_lines: int, restart_wait_s: float
) -> HostResult:
    """Run ``action`` on an open connection; returns the result or raises ``_HostFailure``."""
    if action is Action.CHECK:
        done = await _run(conn, host, check_script(host))
        if done.exit_status != 0:
            raise _exit_failure("the check", done)
        lines = done.stdout.split()
        machine, version = [*lines, "?", "?"][:2]
        problems = []
        if machine not in SUPPORTED_MACHINES:
            problems.append(
                f"machine {machine!r} is not 64-bit ({'/'.join(SUPPORTED_MACHINES)}): install the "
                "64-bit Raspberry Pi OS (numpy/torch/flwr wheels need it)"
            )
        try:
            parsed = tuple(int(p) for p in version.split(".")[:2])
        except ValueError:
            parsed = (0, 0)
        if parsed < MIN_PYTHON:
            problems.append(
                f"Python {version} < {'.'.join(map(str, MIN_PYTHON))}: use Raspberry Pi OS Bookworm or newer"
            )
        detail = f"{machine}, Python {version}"
        if problems:
            raise _HostFailureError(Outcome.FAILED, f"{detail}: " + "; ".join(problems))
        return _result(host, action, Outcome.OK, detail, done)
    if action is Action.PROVISION:
        done = await _run(conn, host, provision_script(host))
        if done.exit_status != 0:
            raise _exit_failure("provisioning", done)
        return _result(
            host,
            action,
            Outcome.OK,
            f"{host.flower_requirement}, {host.torch_spec}; {unit_path(host)} enabled",
            done,
        )
    if action in (Action.START, Action.STOP):
        done = await _run(conn, host, systemctl_script(host, action.value))
        if done.exit_status != 0:
            raise _exit_failure(f"systemctl {action.value}", done)
        return _result(host, action, Outcome.OK, done.stdout.strip() or action.value, done)
    if action is Action.STATUS:
        done = await _run(conn, host, systemctl_script(host, "is-active"))
        state = done.stdout.strip()
        if not state:
            raise _exit_failure("systemctl is-active", done)
        return _result(host, action, Outcome.OK, state, done)
    if action is Action.LOGS:
        done = await _run(conn, host, logs_script(host, log_lines))
        if done.exit_status != 0:
            raise _exit_failure("journalctl", done)
        return _result(host, action, Outcome.OK, f"{len(done.stdout.splitlines())} line(s)", done)
    if action is Action.RESTART:
        done = await _run(conn, host, systemctl_script(host, "restart"))
        if done.exit_status != 0:
            raise _exit_failure("systemctl restart", done)
        deadline = time.monotonic() + restart_wait_s
        state = done.stdout.strip()
        while state != "active" and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            state = (await _run(conn, host, systemctl_script(host, "is-active"), 30)).stdout.strip()
        if state != "active":
            raise _HostFailureError(
                Outcome.FAILED, f"{host.service} is {state or 'unknown'} {restart_wait_s:.0f} s after restart"
            )
        return _result(host, action, Outcome.OK, "active", done)
    raise ValueError(f"unknown action {action!r}")  # pragma: no cover


def _result(host: Host, action: Action, outcome: Outcome, detail: str, done: Any = None) -> HostResult:
    return HostResult(
        host=host.name,
        action=action,
        outcome=outcome,
        detail=detail,
        exit_status=None if done is None else done.exit_status,
        stdout="" if done is None else str(done.stdout or ""),
        stderr="" if done is None else str(done.stderr or ""),
    )


async def _on_host(host: Host, action: Action, *, log_lines: int, restart_wait_s: float) -> HostResult:
    start = time.monotonic()
    try:
        conn = await _connect(host)
        async with conn:
            result = await _perform(conn, host, action, log_lines=log_lines, restart_wait_s=restart_wait_s)
    except Exception as error:  # every failure is this host's, never the fleet's
        failure = _classify(host, error)
        logger.info("%s: %s: %s", host.name, failure.outcome.value, failure.detail)
        result = HostResult(host.name, action, failure.outcome, failure.detail)
    return HostResult(**{**result.__dict__, "duration_s": round(time.monotonic() - start, 3)})


async def run_action(
    hosts: Sequence[Host],
    action: Action | str,
    *,
    concurrency: int = 8,
    log_lines: int = 50,
    restart_wait_s: float = 60.0,
    on_result: Callable[[HostResult], None] | None = None,
) -> list[HostResult]:
    """Run ``action`` on ``hosts`` (at most ``concurrency`` at once; ``restart`` one by one).

    Returns one :class:`HostResult` per host, in the order of ``hosts``.
    """
    action = Action(action)
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if action is Action.RESTART:
        results: list[HostResult] = []
        halted: str | None = None
        for host in hosts:
            if halted is not None:
                result = HostResult(host.name, action, Outcome.SKIPPED, f"not restarted: {halted}")
            else:
                result = await _on_host(host, action, log_lines=log_lines, restart_wait_s=restart_wait_s)
                if result.outcome is Outcome.FAILED:
                    halted = f"{host.name} did not come back after its restart"
            results.append(result)
            if on_result is not None:
                on_result(result)
        return results
    gate = asyncio.Semaphore(concurrency)

    async def one(host: Host) -> HostResult:
        async with gate:
            result = await _on_host(host, action, log_lines=log_lines, restart_wait_s=restart_wait_s)
        if on_result is not None:
            on_result(result)
        return result

    return list(await asyncio.gather(*(one(h) for h in hosts)))


def run_fleet(hosts: Sequence[Host], action: Action | str, **options: Any) -> list[HostResult]:
    """:func:`run_action` from synchronous code (starts and closes its own event loop)."""
    return asyncio.run(run_action(hosts, action, **options))
