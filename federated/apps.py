"""Flower apps built by factories: :func:`make_client_app` and :func:`make_server_app`.

The ServerApp runs Flower's own strategy (``FedAvgM``, or ``FedProx`` when the federation asks for a
proximal term) with the steps that are ours overridden (:mod:`federated.strategy`): every reply is
validated (and possibly rejected) before aggregation and the bytes of every message are counted. Flower's
``Strategy.start`` drives the rounds. Each round:

1. sample devices, send each a ``train`` message: ``"arrays"`` (the global shared tensors, sorted keys)
   and ``"config"`` (round, the federation's JSON, the backbone digest); with ``ship_backbone``, a device
   that has not confirmed the server's backbone also gets ``"backbone"`` (the frozen tensors as held,
   :mod:`federated.backbone`);
2. each device loads them, trains on its own stream, replies ``"update"`` + ``"aux"`` (the compressed
   delta of the shared tensors), ``"metrics"`` (``num-examples`` and its accuracies) and ``"device"``
   (the digest of the backbone it holds);
3. the server validates every reply (:mod:`federated.validation`), averages the accepted updates weighted
   by samples (FedAvg / FedProx, :mod:`federated.aggregation`), steps with the server's momentum if
   configured (FedAvgM) and evaluates the global model on its
   test set (or, in personalised mode, averages the devices' local accuracies).

Node config keys a SuperNode may set: ``partition-id``, ``num-partitions`` (required outside simulation,
where Flower sets them) and ``state-dir`` (default ``~/.cache/ondevice/federated/partition-<id>``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from federated.backbone import BACKBONE_RECORD, DEVICE_RECORD, device_record
from federated.client import DeviceLearner
from federated.config import FederatedConfig
from federated.errors import FederatedError, PayloadError
from federated.records import encode_update, from_record, to_record
from federated.strategy import ARRAYS_RECORD, CONFIG_RECORD, RoundRecord, make_strategy
from federated.validation import METRICS_RECORD, NUM_EXAMPLES
from ondevice.checkpoint import atomic_write_bytes
from ondevice.errors import ConfigError
from ondevice.pretrain import default_cache_dir

__all__ = [
    "RoundRecord",
    "ServerOutcome",
    "make_client_app",
    "make_server_app",
    "run_server",
    "write_results",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------------
def _node_int(context: Context, key: str) -> int:
    value = context.node_config.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"node config {key!r} must be an int, got {value!r}; start the SuperNode with "
            f'--node-config "partition-id=0 num-partitions=2"'
        )
    return value


def _state_dir(context: Context, partition_id: int, state_root: str | None) -> Path:
    configured = context.node_config.get("state-dir")
    if isinstance(configured, str) and configured:
        return Path(configured).expanduser()
    if state_root is not None:
        return Path(state_root) / f"partition-{partition_id}"

    return default_cache_dir() / "federated" / f"partition-{partition_id}"


def _read_instruction(message: Message, expected: FederatedConfig | None) -> tuple[FederatedConfig, int, str]:
    record = message.content.get(CONFIG_RECORD)
    if not isinstance(record, ConfigRecord):
        raise PayloadError(f"message has no {CONFIG_RECORD!r} ConfigRecord")
    text, server_round, digest = record.get("federation"), record.get("server-round"), record.get("backbone")
    if not isinstance(text, str) or not isinstance(digest, str):
        raise PayloadError("config record needs 'federation' (JSON) and 'backbone' strings")
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 1:
        raise PayloadError(f"config record 'server-round' must be a positive int, got {server_round!r}")
    config = FederatedConfig.from_json(text)
    if expected is not None and config != expected:
        raise FederatedError(
            "the server runs another federation configuration than this ClientApp was built for; build both "
            "apps from the same FederatedConfig"
        )
    return config, server_round, digest


def _learner(
    message: Message, context: Context, expected: FederatedConfig | None, state_root: str | None
) -> tuple[DeviceLearner, int]:
    torch.set_num_threads(1)
    config, server_round, digest = _read_instruction(message, expected)
    partition_id = _node_int(context, "partition-id")
    num_partitions = _node_int(context, "num-partitions")
    learner = DeviceLearner(
        config,
        partition_id=partition_id,
        num_partitions=num_partitions,
        state_dir=_state_dir(context, partition_id, state_root),
        backbone=message.content.get(BACKBONE_RECORD) if config.ship_backbone else None,
        announced_digest=digest,
    )
    if learner.digest != digest:
        raise FederatedError(
            f"this device's frozen backbone (digest {learner.digest[:16]}...) differs from the server's "
            f"({digest[:16]}...); copy the server's pretrained cache file to the device, or let the server "
            f"ship its backbone (run config ship-backbone = true)"
        )
    return learner, server_round


def _state_note(learner: DeviceLearner) -> str | None:
    """What the device tells the server about a saved state it could not (wholly) keep."""
    if learner.state_error is not None:
        return f"its state file was refused ({learner.state_error}); it starts from the shared start"
    return learner.state_note


def make_client_app(config: FederatedConfig | None = None, *, state_root: str | None = None) -> ClientApp:
    """A ClientApp whose devices train their prepared model and send the (compressed) shared update.

    Args:
        config: if given, the device refuses a server running another configuration; if None it follows
            the server's (validated) configuration.
        state_root: parent of per-partition state directories when a node config sets no ``state-dir``.
    """
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        learner, server_round = _learner(message, context, config, state_root)
        update = learner.train_round(
            from_record(message.content.get(ARRAYS_RECORD)), server_round=server_round
        )
        encoded = encode_update(
            update.deltas,
            learner.config.compression_obj,
            learner.residuals,
            statistics=learner.statistics,
        )
        learner.residuals = encoded.residuals
        learner.save_state()
        metrics = MetricRecord({NUM_EXAMPLES: int(update.num_examples), **update.metrics})
        content = RecordDict(
            {
                "update": encoded.update,
                "aux": encoded.aux,
                METRICS_RECORD: metrics,
                DEVICE_RECORD: device_record(learner.digest, state_note=_state_note(learner)),
            }
        )
        return Message(content=content, reply_to=message)

    @app.evaluate()
    def evaluate_(message: Message, context: Context) -> Message:
        learner, _ = _learner(message, context, config, state_root)
        result = learner.evaluate(from_record(message.content.get(ARRAYS_RECORD)))
        metrics = MetricRecord(
            {"accuracy": result.accuracy, "loss": result.loss, NUM_EXAMPLES: int(result.samples)}
        )
        return Message(content=RecordDict({METRICS_RECORD: metrics}), reply_to=message)

    return app


# ---------------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ServerOutcome:
    """What :func:`run_server` ends with: the round records and the final global shared tensors."""

    rounds: tuple[RoundRecord, ...]
    arrays: dict[str, np.ndarray]


def run_server(
    grid: Grid,
    config: FederatedConfig,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    min_nodes: int = 1,
    node_wait_s: float | None = None,
) -> ServerOutcome:
    """Run the federation's strategy (:func:`federated.strategy.make_strategy`) with Flower's ``start``.

    Before the first round it waits up to ``node_wait_s`` (default ``config.round_timeout_s``) for
    ``min_nodes`` devices, then goes on with those connected; later rounds ask the connected devices
    that still answer, without waiting for one that stopped answering until it reconnects
    (:mod:`federated.roster`); replies are awaited ``round_timeout_s``.
    Each round is logged as it ends (:meth:`RoundRecord.summary`) and passed to ``on_round``.
    """

    def each_round(record: RoundRecord) -> None:
        logger.info("%s", record.summary(config.rounds))
        if on_round is not None:
            on_round(record)

    strategy = make_strategy(config, on_round=each_round, min_nodes=min_nodes, node_wait_s=node_wait_s)
    result = strategy.start(
        grid,
        to_record(strategy.initial_arrays),
        num_rounds=config.rounds,
        timeout=config.round_timeout_s,
        evaluate_fn=strategy.evaluate_round,
    )
    arrays = from_record(result.arrays) if len(result.arrays) else dict(strategy.initial_arrays)
    return ServerOutcome(tuple(strategy.records), arrays)


def make_server_app(
    config: FederatedConfig | None = None,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    min_nodes: int | None = None,
) -> ServerApp:
    """A ServerApp running :func:`run_server` (Flower's strategy, :mod:`federated.strategy`).

    Args:
        config: the federation; None reads it from the run config (``flwr run``, ``[tool.flwr.app.config]``
            in kebab-case, see :meth:`FederatedConfig.to_run_config`).
        on_round: called with each :class:`RoundRecord` (progress bars, collecting results).
        on_error: called with an exception that ends the run (Flower itself only logs it).
        min_nodes: devices to wait for before the first round (default: run config ``min-nodes``, else 1).

    The run config may also set ``node-wait-s``: how long to wait for ``min-nodes`` devices before the
    first round, or for any device when none is left (default ``round-timeout-s``). If the run config
    has ``results-path``, the rounds so far are written there as JSON after every round (atomically, see
    :func:`write_results`). Each round is logged
    as it ends (devices asked, answered, accepted, rejected with node IDs and reasons, accuracy, bytes)
    and, while the ServerApp runs, this package's log lines go to Flower's console, so ``flwr log`` shows
    the run as it goes.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            _main(grid, context)
        except BaseException as exc:
            if on_error is not None:
                on_error(exc)
            raise

    def _main(grid: Grid, context: Context) -> None:
        settings = config if config is not None else FederatedConfig.from_run_config(context.run_config)
        wanted = min_nodes if min_nodes is not None else context.run_config.get("min-nodes", 1)
        if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
            raise ConfigError(
                f"run config min-nodes must be a positive int (devices to wait for before the first round), "
                f'got {wanted!r}; pass e.g. --run-config "min-nodes=3"'
            )
        node_wait = context.run_config.get("node-wait-s")
        if node_wait is not None and (
            isinstance(node_wait, bool) or not isinstance(node_wait, int | float) or node_wait < 0
        ):
            raise ConfigError(
                f"run config node-wait-s must be a number of seconds >= 0, got {node_wait!r}; pass e.g. "
                '--run-config "node-wait-s=120.0"'
            )
        target = context.run_config.get("results-path")
        done: list[RoundRecord] = []

        def each_round(record: RoundRecord) -> None:
            done.append(record)
            if isinstance(target, str) and target:
                write_results(target, settings, done)
            if on_round is not None:
                on_round(record)

        with _shown_by_flower():
            run_server(
                grid,
                settings,
                on_round=each_round,
                min_nodes=wanted,
                node_wait_s=None if node_wait is None else float(node_wait),
            )

    return app


def write_results(path: str | os.PathLike[str], config: FederatedConfig, rounds: list[RoundRecord]) -> None:
    """Write ``{"config": ..., "rounds": [...]}`` as JSON, atomically (a reader never sees half a file)."""
    payload = {"config": config.to_dict(), "rounds": [r.to_dict() for r in rounds]}
    atomic_write_bytes(os.path.expanduser(os.fspath(path)), json.dumps(payload, indent=2).encode())


@contextlib.contextmanager
def _shown_by_flower() -> Iterator[None]:
    """While a ServerApp runs, this package's INFO lines also go to Flower's console handler.

    The ServerApp is the top of its process, and Flower sends that process's console output to
    ``flwr log``; without a handler, Python would drop INFO records. Only when nothing handles this
    package's records already (a ServerApp process under Flower); records still propagate as usual.
    """
    from flwr.common.logger import console_handler

    package = logging.getLogger("federated")
    added = not package.hasHandlers()  # an application that configured logging (the CLI) keeps its own
    level = package.level
    if added:
        package.addHandler(console_handler)
        if package.level == logging.NOTSET or package.level > logging.INFO:
            package.setLevel(logging.INFO)
    try:
        yield
    finally:
        if added:
            package.removeHandler(console_handler)
        package.setLevel(level)
