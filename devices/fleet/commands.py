"""Run a fleet action on many Pis over SSH (asyncssh), concurrently, with one precise result per host.

``check`` verifies a 64-bit OS and Python >= 3.11; ``provision`` copies the ondevice wheel and the shared
pretrained backbone over SFTP (:class:`devices.fleet.bundle.Bundle`), creates a venv with pinned Flower
and torch plus that wheel, checks that it imports ``ondevice`` and ``federated``, installs, enables and
(re)starts the SuperNode unit and reports its real state; ``start``/``stop``/``status`` drive systemd
and judge the unit's real state (a unit that is not ``active`` after ``start``, or in ``status``, is a
failed host); ``restart`` is rolling (one host at a time, waiting until the unit is ``active`` before
the next; a host that does not come back stops the roll-out, and the rest are reported ``skipped``);
``logs`` tails the journal. A host that is unreachable, refuses the key, presents an unknown host key,
accepts TCP but never speaks SSH, exits non-zero or times out is reported as such, by name and with what
to check, and never stops the other hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from devices.fleet.bundle import WHEELHOUSE_COMMAND, Bundle
from devices.fleet.inventory import Host
from devices.fleet.remote import (
    MIN_PYTHON,
    SUPPORTED_MACHINES,
    cache_dir,
    check_script,
    dist_dir,
    logs_script,
    prepare_script,
    provision_script,
    systemctl_script,
    unit_path,
    wheelhouse_dir,
)

__all__ = ["Action", "HostResult", "Outcome", "run_action", "run_fleet", "summary"]

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
    if isinstance(error, asyncssh.TimeoutError):  # a command's own time limit (conn.run(timeout=...))
        return _HostFailureError(
            Outcome.TIMEOUT,
            f"{host.name}: the command did not finish within {host.command_timeout_s:g} s "
            "(inventory field 'command_timeout_s'); look at the Pi's load and at `ondevice fleet logs`",
        )
    if isinstance(error, asyncio.TimeoutError | TimeoutError):
        return _HostFailureError(
            Outcome.TIMEOUT,
            f"{host.name} ({where}) did not answer within {host.connect_timeout_s:g} s: check that it is "
            "powered and on the network, its address and port in the inventory, and firewalls between",
        )
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


async def _accepts_tcp(host: Host) -> bool:
    """Whether ``host`` accepts a TCP connection on its SSH port (asked after an SSH connect timed out)."""
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.address, host.port), timeout=min(host.connect_timeout_s, 5.0)
        )
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True


def _silent_host(host: Host) -> _HostFailureError:
    return _HostFailureError(
        Outcome.TIMEOUT,
        f"{host.name} ({host.address}:{host.port}) accepts TCP connections but sent no SSH greeting within "
        f"{host.connect_timeout_s:g} s: check that sshd (and not another service) listens on port "
        f"{host.port}, that the Pi is not hung or swapping (power-cycle it), and that MaxStartups in its "
        "sshd_config is not exhausted; raise connect_timeout_s for a slow host",
    )


def _exit_failure(what: str, completed: Any) -> _HostFailureError:
    return _HostFailureError(
        Outcome.FAILED,
        f"{what} exited with status {completed.exit_status}: {_tail(completed.stderr or completed.stdout)}",
    )


_SETTLING = frozenset({"activating", "deactivating", "reloading"})


@dataclass(frozen=True)
class _UnitState:
    active: str
    sub: str

    @property
    def running(self) -> bool:
        return self.active == "active" and self.sub in ("running", "")

    def __str__(self) -> str:
        return f"{self.active} ({self.sub})" if self.sub else self.active


async def _unit_state(conn: Any, host: Host) -> _UnitState:
    done = await _run(conn, host, systemctl_script(host, "show"), 30)
    fields = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    active = fields.get("ActiveState", "").strip()
    if not active:
        raise _exit_failure("systemctl show", done)
    return _UnitState(active, fields.get("SubState", "").strip())


def _not_running(host: Host, state: _UnitState, when: str) -> _HostFailureError:
    hint = (
        "the SuperNode keeps exiting"
        if state.active in _SETTLING or state.active == "failed"
        else "the unit is not running"
    )
    return _HostFailureError(
        Outcome.FAILED,
        f"{host.service} is {state} {when}: {hint}; see `ondevice fleet logs --hosts {host.name}`",
    )


async def _until_running(conn: Any, host: Host, *, wait_s: float, settle_s: float) -> _UnitState:
    """Poll the unit until it runs (or ``wait_s`` passed), then confirm it still runs ``settle_s`` later.

    A ``Type=simple`` unit is ``active`` the moment its process starts, so one look right after a start
    cannot tell a SuperNode that runs from one that exits a second later and is restarted by systemd.
    """
    deadline = time.monotonic() + wait_s
    state = await _unit_state(conn, host)
    while not state.running and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        state = await _unit_state(conn, host)
    if state.running and settle_s > 0:
        await asyncio.sleep(settle_s)
        state = await _unit_state(conn, host)
    return state


async def _upload(conn: Any, host: Host, bundle: Bundle) -> int:
    """Copy the wheel, the backbone files and the wheelhouse over SFTP into the folders
    :func:`prepare_script` made; returns how many wheelhouse wheels were copied.

    A wheelhouse wheel already on the host with the same size is not copied again (a wheel's name holds
    its version, and torch alone is over 100 MB), so provisioning the fleet again copies only what changed.
    """
    copied = 0
    async with conn.start_sftp_client() as sftp:
        await sftp.put(str(bundle.wheel), f"{dist_dir(host)}/{bundle.wheel.name}")
        for path in bundle.backbones:
            await sftp.put(str(path), f"{cache_dir(host)}/pretrained/{path.name}")
        for path in bundle.wheelhouse_files:
            remote = f"{wheelhouse_dir(host)}/{path.name}"
            if await sftp.exists(remote) and (await sftp.stat(remote)).size == path.stat().st_size:
                continue
            await sftp.put(str(path), remote)
            copied += 1
    return copied


async def _perform(
    conn: Any,
    host: Host,
    action: Action,
    *,
    log_lines: int,
    restart_wait_s: float,
    settle_s: float,
    bundle: Bundle | None,
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
        if bundle is None:
            raise ValueError("provision needs a bundle (the ondevice wheel and the backbone files)")
        prepared = await _run(conn, host, prepare_script(host), 60)
        if prepared.exit_status != 0:
            raise _exit_failure("creating the folders", prepared)
        copied = await _upload(conn, host, bundle)
        offline = bundle.wheelhouse is not None
        done = await _run(conn, host, provision_script(host, bundle.wheel.name, offline=offline))
        if done.exit_status != 0:
            failure = _exit_failure("provisioning", done)
            if offline and "No matching distribution" in f"{done.stdout}{done.stderr}":
                failure = _HostFailureError(
                    failure.outcome,
                    f"{failure.detail}; the wheelhouse lacks a wheel this Pi can install (its machine and "
                    f"Python: `ondevice fleet check`): refill it with `{WHEELHOUSE_COMMAND}`",
                )
            raise failure
        state = await _until_running(conn, host, wait_s=restart_wait_s, settle_s=settle_s)
        if not state.running:
            raise _not_running(host, state, "after provisioning")
        version = next(
            (line for line in done.stdout.splitlines() if line.startswith("ondevice ")), "ondevice"
        )
        return _result(
            host,
            action,
            Outcome.OK,
            f"{version}, {host.flower_requirement}, {len(bundle.backbones)} backbone file(s)"
            + (f", offline from {len(bundle.wheelhouse_files)} wheel(s) ({copied} copied)" if offline else "")
            + f"; {unit_path(host)} enabled, {state}",
            done,
        )
    if action in (Action.START, Action.RESTART):
        done = await _run(conn, host, systemctl_script(host, action.value))
        if done.exit_status != 0:
            raise _exit_failure(f"systemctl {action.value}", done)
        state = await _until_running(conn, host, wait_s=restart_wait_s, settle_s=settle_s)
        if not state.running:
            raise _not_running(host, state, f"{restart_wait_s:g} s after {action.value}")
        return _result(host, action, Outcome.OK, str(state.active), done)
    if action is Action.STOP:
        done = await _run(conn, host, systemctl_script(host, "stop"))
        if done.exit_status != 0:
            raise _exit_failure("systemctl stop", done)
        state = await _unit_state(conn, host)
        if state.active in ("active", *_SETTLING):
            raise _HostFailureError(Outcome.FAILED, f"{host.service} is still {state} after stop")
        return _result(host, action, Outcome.OK, state.active, done)
    if action is Action.STATUS:
        state = await _unit_state(conn, host)
        if not state.running:
            raise _not_running(host, state, "now")
        return _result(host, action, Outcome.OK, str(state.active))
    if action is Action.LOGS:
        done = await _run(conn, host, logs_script(host, log_lines))
        if done.exit_status != 0:
            raise _exit_failure("journalctl", done)
        return _result(host, action, Outcome.OK, f"{len(done.stdout.splitlines())} line(s)", done)
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


async def _on_host(host: Host, action: Action, **options: Any) -> HostResult:
    start = time.monotonic()
    try:
        try:
            conn = await _connect(host)
        except TimeoutError:
            if await _accepts_tcp(host):
                raise _silent_host(host) from None
            raise
        async with conn:
            result = await _perform(conn, host, action, **options)
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
    settle_s: float = 3.0,
    bundle: Bundle | None = None,
    on_result: Callable[[HostResult], None] | None = None,
) -> list[HostResult]:
    """Run ``action`` on ``hosts`` (at most ``concurrency`` at once; ``restart`` one by one).

    ``restart_wait_s`` is how long ``start``/``restart``/``provision`` wait for the unit to run, and
    ``settle_s`` how long it must then keep running to count as started. ``provision`` needs ``bundle``.
    Returns one :class:`HostResult` per host, in the order of ``hosts``.
    """
    action = Action(action)
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if action is Action.PROVISION and bundle is None:
        raise ValueError("provision needs bundle=Bundle(wheel, backbones) (see devices.fleet.bundle)")
    options: dict[str, Any] = {
        "log_lines": log_lines,
        "restart_wait_s": restart_wait_s,
        "settle_s": settle_s,
        "bundle": bundle,
    }
    if action is Action.RESTART:
        results: list[HostResult] = []
        halted: str | None = None
        for host in hosts:
            if halted is not None:
                result = HostResult(host.name, action, Outcome.SKIPPED, f"not restarted: {halted}")
            else:
                result = await _on_host(host, action, **options)
                if result.outcome is Outcome.FAILED:
                    halted = f"{host.name} did not come back after its restart"
            results.append(result)
            if on_result is not None:
                on_result(result)
        return results
    gate = asyncio.Semaphore(concurrency)

    async def one(host: Host) -> HostResult:
        async with gate:
            result = await _on_host(host, action, **options)
        if on_result is not None:
            on_result(result)
        return result

    return list(await asyncio.gather(*(one(h) for h in hosts)))


def run_fleet(hosts: Sequence[Host], action: Action | str, **options: Any) -> list[HostResult]:
    """:func:`run_action` from synchronous code (starts and closes its own event loop)."""
    return asyncio.run(run_action(hosts, action, **options))


def summary(results: Sequence[HostResult]) -> str:
    """The closing line of a fleet command: ``"2 ok, 1 failed"`` (``", 1 skipped"`` when any were)."""
    ok = sum(r.ok for r in results)
    skipped = sum(r.outcome is Outcome.SKIPPED for r in results)
    line = f"{ok} ok, {len(results) - ok - skipped} failed"
    return line + (f", {skipped} skipped" if skipped else "")
