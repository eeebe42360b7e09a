"""``federated.simulate(...)``: many devices on one laptop, on Flower's Simulation Engine.

The same ClientApp and ServerApp as a deployment (:mod:`federated.apps`) run under
``flwr.simulation.run_simulation`` with the Ray backend; the ServerApp runs in a thread of this process,
so its round records come straight back. Device state goes to a temporary directory (or ``state_dir``).

Ray takes ~10 s to start on a small machine. :func:`prestart_engine` starts it in a background thread,
with the arguments Flower's Ray backend would use, so that an application can overlap the start with
other work; the next :func:`simulate` waits for it and finds Ray running (Flower then skips its own
``ray.init``). The simulation shuts Ray down at its end, as it does when it started Ray itself.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from federated.apps import RoundRecord, make_client_app, make_server_app
from federated.config import FederatedConfig
from federated.errors import FederatedError

__all__ = ["SimulationResult", "prestart_engine", "simulate"]

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
                    logging_level="WARNING" if verbose else "ERROR",
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


@dataclass(frozen=True)
class SimulationResult:
    """What a simulated federation came to.

    Attributes:
        config: the federation.
        rounds: one :class:`~federated.apps.RoundRecord` per round.
        seconds: wall time of the whole simulation (Ray start-up included).
    """

    config: FederatedConfig
    rounds: tuple[RoundRecord, ...]
    seconds: float

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
            "seconds": self.seconds,
        }


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
        config: the federation (default ``FederatedConfig()``); keyword ``overrides`` replace its fields,
            e.g. ``simulate(num_clients=10, scheme="full", partition="dirichlet:0.3")``.
        state_dir: parent of the devices' state directories (default: a temporary directory, removed).
        on_round: called with each round's record as it completes.
        cpus_per_client: Ray CPUs per running ClientApp (so ``os.cpu_count() / cpus_per_client`` devices
            train at once).
        verbose: let Flower log at DEBUG level.

    Raises:
        FederatedError: the ServerApp failed (the original error is chained).
    """
    from flwr.simulation import run_simulation

    from ondevice.pretrain import pretrain

    base = config or FederatedConfig()
    if overrides:
        payload = base.to_dict()
        payload.update(overrides)
        base = FederatedConfig.from_dict(payload)
    # Pretrain (or load) the backbone here, once, so that devices load the same cached file.
    pretrain(base.model, classes=base.pretrain_classes, seed=base.seed)
    records: list[RoundRecord] = []
    failures: list[BaseException] = []

    def collect(record: RoundRecord) -> None:
        records.append(record)
        if on_round is not None:
            on_round(record)

    server_app = make_server_app(base, on_round=collect, on_error=failures.append, min_nodes=base.num_clients)

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
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=base.num_clients,
                backend_config=backend_config,  # type: ignore[arg-type]
                verbose_logging=verbose,
            )
        finally:
            flwr_logger.removeFilter(quiet)
            if prestarted is not None:
                prestarted.release()
        seconds = time.perf_counter() - start
    if failures:
        raise FederatedError(f"the simulated ServerApp failed: {failures[0]}") from failures[0]
    if len(records) != base.rounds:
        raise FederatedError(f"the simulation stopped after {len(records)} of {base.rounds} rounds")
    return SimulationResult(config=base, rounds=tuple(records), seconds=seconds)
