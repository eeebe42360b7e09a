"""``federated.simulate(...)``: many devices on one laptop, on Flower's Simulation Engine.

The same ClientApp and ServerApp as a deployment (:mod:`federated.apps`) run under
``flwr.simulation.run_simulation`` with the Ray backend; the ServerApp runs in a thread of this process,
so its round records come straight back. Device state goes to a temporary directory (or ``state_dir``).

Ctrl-C (SIGINT) during :func:`simulate`, when it runs in the main thread, stops the federation at the
next message exchange: the ServerApp stops waiting for replies, Flower's Simulation Engine stops its
workers and Ray shuts down, and :class:`SimulationInterrupted` (a ``KeyboardInterrupt``) is raised with
the rounds completed so far. A second Ctrl-C interrupts at once.

Ray takes ~10 s to start on a small machine. :func:`prestart_engine` starts it in a background thread,
with the arguments Flower's Ray backend would use, so that an application can overlap the start with
other work; the next :func:`simulate` waits for it and finds Ray running (Flower then skips its own
``ray.init``). The simulation shuts Ray down at its end, as it does when it started Ray itself.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

from flwr.app import Message
from flwr.common import Context
from flwr.serverapp import Grid, ServerApp

from federated.apps import RoundRecord, make_client_app, make_server_app
from federated.config import FederatedConfig
from federated.errors import FederatedError
from ondevice.pretrain import pretrain

__all__ = ["SimulationInterrupted", "SimulationResult", "prestart_engine", "simulate"]

logger = logging.getLogger(__name__)


class _Prestart:
    """Ray started by a thread that stays alive until the simulation is over.

    Ray's node processes die with the *thread* that spawned them (``PR_SET_PDEATHSIG`` is per thread on
    Linux), so the starting thread waits for :meth:`release` instead of returning.
    """

    def __init__(self, verbose: bool) -> None:
        self.ready = threading.Event()
        self.released = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(verbose,), name="ondevice-ray", daemon=True)
        self.thread.start()

    def _run(self, verbose: bool) -> None:
        try:
            import ray

            if not ray.is_initialized():
                # As flwr's RayBackend.init_ray: the workers get this process's import path.
                pythonpath = os.pathsep.join(sys.path)
                if os.environ.get("PYTHONPATH"):
                    pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
                # Outside the main thread Ray warns that it sets no SIGTERM handler; the simulation's
                # end shuts Ray down all the same, so that warning is not shown unless verbose.
                if not verbose:
                    _quiet_ray_warnings()
                ray.init(
                    runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                    include_dashboard=False,
                    logging_level=logging.WARNING if verbose else logging.ERROR,
                    **_ray_init_args(verbose),
                )
        except BaseException as exc:  # reported; simulate() then starts Ray itself
            self.error = exc
        finally:
            self.ready.set()
        self.released.wait()

    def release(self) -> None:
        self.released.set()
        self.thread.join()


_prestart: _Prestart | None = None


def _quiet_ray_warnings() -> None:
    """Hide Ray's FutureWarning about GPU environment variables (we ask for no GPUs; process-wide)."""
    warnings.filterwarnings(
        "ignore", message=r".*Ray will no longer override accelerator", category=FutureWarning
    )


class _DropDeprecation(logging.Filter):
    """Drop Flower's notice that ``run_simulation`` is deprecated.

    We call it on purpose: it runs Python-object apps in this process, which ``flwr run`` cannot.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "deprecated feature" not in str(record.msg).lower()


def _ray_init_args(verbose: bool) -> dict[str, Any]:
    return {"num_cpus": max(1, os.cpu_count() or 1), "log_to_driver": verbose}


def prestart_engine(*, verbose: bool = False) -> None:
    """Start the Simulation Engine's Ray runtime in a background thread (see the module docstring).

    Idempotent; a failure to start is not raised here: :func:`simulate` then starts Ray as usual.
    """
    global _prestart
    if _prestart is None:
        _prestart = _Prestart(verbose)


def _await_prestart() -> _Prestart | None:
    """Wait until a prestarted Ray is up; returns the handle to release after the simulation."""
    global _prestart
    handle, _prestart = _prestart, None
    if handle is None:
        return None
    handle.ready.wait()
    if handle.error is not None:
        logger.warning("starting Ray ahead failed (%s); the simulation starts it", handle.error)
    return handle


class _StopRequestedError(Exception):
    """Raised in the ServerApp's thread when the simulation is asked to stop (Ctrl-C)."""


class _StoppableGrid(Grid):
    """The Simulation Engine's grid, made to give up when ``stop`` is set.

    The ServerApp spends a round in :meth:`send_and_receive` (and waits for devices in
    :meth:`get_node_ids`); both check ``stop``, so a Ctrl-C ends the ServerApp at once instead of after the
    round's timeout. Everything else is the engine's grid, called as it is.
    """

    def __init__(self, grid: Grid, stop: threading.Event, poll_s: float = 0.05) -> None:
        self._grid = grid
        self._stop = stop
        self._poll_s = poll_s

    def _check(self) -> None:
        if self._stop.is_set():
            raise _StopRequestedError("the simulation was interrupted")

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(
        self,
        content: Any,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self._grid.get_node_ids()

    def get_nodes(self) -> Any:
        self._check()
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._check()
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._check()
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` and pull their replies until all came, ``timeout`` passed or a stop.

        Nothing to send (the strategy's empty evaluate step) returns at once, even after a stop, so a round
        whose training replies came in still ends with its record.
        """
        messages = list(messages)
        if not messages:
            return []
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            self._stop.wait(self._poll_s)
        return replies


@contextmanager
def _stop_on_sigint(stop: threading.Event) -> Iterator[None]:
    """While the block runs, the first SIGINT sets ``stop``; a second one raises ``KeyboardInterrupt``.

    Only the main thread can set signal handlers; elsewhere SIGINT keeps its usual meaning.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        logger.warning("interrupted: stopping the simulation (press Ctrl-C again to stop at once)")
        stop.set()

    signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass(frozen=True)
class SimulationResult:
    """What a simulated federation came to.

    Attributes:
        config: the federation.
        rounds: one :class:`~federated.apps.RoundRecord` per completed round.
        seconds: wall time of the whole simulation (Ray start-up included).
        interrupted: Ctrl-C stopped the simulation after ``len(rounds)`` of ``config.rounds`` rounds.
    """

    config: FederatedConfig
    rounds: tuple[RoundRecord, ...]
    seconds: float
    interrupted: bool = False

    @property
    def final_accuracy(self) -> float | None:
        """The last round's accuracy: the global model's, or the devices' mean when personalised."""
        if not self.rounds:
            return None
        last = self.rounds[-1]
        return last.accuracy if last.accuracy is not None else last.client_accuracy

    @property
    def bytes_per_round(self) -> float:
        """Mean array bytes per round, down and up together."""
        if not self.rounds:
            return 0.0
        return sum(r.bytes_down + r.bytes_up for r in self.rounds) / len(self.rounds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "rounds": [r.to_dict() for r in self.rounds],
            "final_accuracy": self.final_accuracy,
            "bytes_per_round": self.bytes_per_round,
            "bytes_up_total": sum(r.bytes_up for r in self.rounds),
            "bytes_down_total": sum(r.bytes_down for r in self.rounds),
            "backbone_bytes_total": sum(r.backbone_bytes for r in self.rounds),
            "seconds": self.seconds,
            "interrupted": self.interrupted,
        }


class SimulationInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`simulate`; :attr:`result` holds the rounds completed before it.

    A ``KeyboardInterrupt``, so that code which does not know it still stops as on any Ctrl-C.
    """

    def __init__(self, result: SimulationResult) -> None:
        self.result = result
        super().__init__(
            f"the simulation was interrupted after {len(result.rounds)} of {result.config.rounds} rounds"
        )


def simulate(
    config: FederatedConfig | None = None,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    cpus_per_client: float = 1.0,
    verbose: bool = False,
    **overrides: Any,
) -> SimulationResult:
    """Simulate ``config.num_clients`` devices for ``config.rounds`` rounds and return the records.

    Args:
        config: the federation (default ``FederatedConfig()``, the defaults ``ondevice simulate`` uses);
            keyword ``overrides`` replace its fields, e.g.
            ``simulate(num_clients=10, scheme="full", partition="dirichlet:0.3")``.
        state_dir: parent of the devices' state directories (default: a temporary directory, removed).
        on_round: called with each round's record as it completes.
        cpus_per_client: Ray CPUs per running ClientApp (so ``os.cpu_count() / cpus_per_client`` devices
            train at once).
        verbose: let Flower log at DEBUG level.

    Raises:
        FederatedError: the ServerApp failed (the original error is chained).
        SimulationInterrupted: Ctrl-C stopped the simulation; it carries the rounds completed so far
            (each device's state is on disk as of its last completed round).
    """
    from flwr.simulation import run_simulation

    base = config or FederatedConfig()
    if overrides:
        payload = base.to_dict()
        payload.update(overrides)
        base = FederatedConfig.from_dict(payload)
    # Pretrain (or load) the backbone here, once, so that devices load the same cached file.
    pretrain(base.model, classes=base.pretrain_classes, seed=base.seed)
    records: list[RoundRecord] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def collect(record: RoundRecord) -> None:
        records.append(record)
        if on_round is not None:
            on_round(record)

    inner = make_server_app(base, on_round=collect, on_error=failures.append, min_nodes=base.num_clients)
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        inner(_StoppableGrid(grid, stop), context)

    with tempfile.TemporaryDirectory(prefix="ondevice-fl-") as tmp:
        root = str(state_dir) if state_dir is not None else tmp
        client_app = make_client_app(base, state_root=root)
        backend_config = {
            "client_resources": {"num_cpus": float(cpus_per_client), "num_gpus": 0.0},
            "init_args": _ray_init_args(verbose),
        }
        prestarted = _await_prestart()
        flwr_logger = logging.getLogger("flwr")
        quiet = _DropDeprecation()
        start = time.perf_counter()
        try:
            if not verbose:
                _quiet_ray_warnings()
                flwr_logger.addFilter(quiet)
            with _stop_on_sigint(stop):
                run_simulation(
                    server_app=server_app,
                    client_app=client_app,
                    num_supernodes=base.num_clients,
                    backend_config=backend_config,  # type: ignore[arg-type]
                    verbose_logging=verbose,
                )
        except _StopRequestedError:
            pass  # the ServerApp stopped on Ctrl-C; reported below
        except KeyboardInterrupt:
            stop.set()  # a second Ctrl-C: stop at once
        except Exception:
            if not stop.is_set():
                raise  # the ServerApp's own error, as Flower re-raises it
        finally:
            flwr_logger.removeFilter(quiet)
            if prestarted is not None:
                prestarted.release()
        seconds = time.perf_counter() - start
    if stop.is_set():
        _shutdown_ray()
        raise SimulationInterrupted(
            SimulationResult(config=base, rounds=tuple(records), seconds=seconds, interrupted=True)
        )
    if failures:
        raise FederatedError(f"the simulated ServerApp failed: {failures[0]}") from failures[0]
    if len(records) != base.rounds:
        raise FederatedError(f"the simulation stopped after {len(records)} of {base.rounds} rounds")
    return SimulationResult(config=base, rounds=tuple(records), seconds=seconds)


def _shutdown_ray() -> None:
    """Make sure no Ray worker outlives an interrupted simulation (Flower shuts Ray down on a normal end)."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception as exc:  # best effort: the interrupt is what the caller must hear about
        logger.warning("shutting Ray down after the interrupt failed: %s", exc)
