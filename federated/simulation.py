"""``federated.simulate(...)``: many devices on one laptop, on Flower's Simulation Engine.

The same ClientApp and ServerApp as a deployment (:mod:`federated.apps`) run under
``flwr.simulation.run_simulation`` with the Ray backend; the ServerApp runs in a thread of this process,
so its round records come straight back. Device state goes to a temporary directory (or ``state_dir``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from federated.apps import RoundRecord, make_client_app, make_server_app
from federated.config import FederatedConfig
from federated.errors import FederatedError

__all__ = ["SimulationResult", "simulate"]

logger = logging.getLogger(__name__)


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
            "init_args": {"num_cpus": max(1, os.cpu_count() or 1), "log_to_driver": verbose},
        }
        start = time.perf_counter()
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=base.num_clients,
            backend_config=backend_config,  # type: ignore[arg-type]
            verbose_logging=verbose,
        )
        seconds = time.perf_counter() - start
    if failures:
        raise FederatedError(f"the simulated ServerApp failed: {failures[0]}") from failures[0]
    if len(records) != base.rounds:
        raise FederatedError(f"the simulation stopped after {len(records)} of {base.rounds} rounds")
    return SimulationResult(config=base, rounds=tuple(records), seconds=seconds)
