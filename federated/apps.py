"""Flower apps built by factories: :func:`make_client_app` and :func:`make_server_app`.

The ServerApp runs its own round loop on Flower's ``Grid`` rather than a stock strategy, because every
reply is validated (and possibly rejected) before aggregation and the bytes of every message are counted;
Flower stays the engine that moves the messages. Each round:

1. sample devices, send each a ``train`` message: ``"arrays"`` (the global shared tensors, sorted keys)
   and ``"config"`` (round, the federation's JSON, the backbone digest);
2. each device loads them, trains on its own stream, replies ``"update"`` + ``"aux"`` (the compressed
   delta of the shared tensors) and ``"metrics"`` (``num-examples`` and its accuracies);
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
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from federated.aggregation import ServerMomentum, weighted_average
from federated.config import FederatedConfig
from federated.device import (
    DeviceLearner,
    backbone_digest,
    build_model,
    load_split,
    statistic_names,
    tensor_spec,
)
from federated.errors import FederatedError, PayloadError
from federated.payload import (
    content_bytes,
    downlink_arrays,
    encode_update,
    from_record,
    to_numpy,
    to_record,
)
from federated.validation import METRICS_RECORD, NUM_EXAMPLES, validate_replies
from ondevice.checkpoint import atomic_write_bytes
from ondevice.errors import ConfigError
from ondevice.trainer import evaluate

__all__ = [
    "RoundRecord",
    "ServerOutcome",
    "make_client_app",
    "make_server_app",
    "run_server",
    "write_results",
]

logger = logging.getLogger(__name__)

ARRAYS_RECORD = "arrays"
CONFIG_RECORD = "config"
_NODE_WAIT_S = 1.0


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
    from ondevice.pretrain import default_cache_dir

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
    )
    if learner.digest != digest:
        raise FederatedError(
            f"this device's frozen backbone (digest {learner.digest}) differs from the server's ({digest}); "
            f"copy the server's pretrained cache file to the device"
        )
    return learner, server_round


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
        content = RecordDict({"update": encoded.update, "aux": encoded.aux, METRICS_RECORD: metrics})
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
@dataclass(frozen=True)
class RoundRecord:
    """One round, as the server saw it.

    Attributes:
        accuracy: the global model's accuracy on the server's test set (None in personalised mode).
        client_accuracy: sample-weighted mean of the accepted devices' local test accuracy after training.
        bytes_down / bytes_up: array bytes of the messages sent / replies received this round.
        asked: the node IDs sampled (sent a train message) this round.
        rejected: ``(node ID, reason)`` for every reply that was not aggregated, named by the node that
            was asked (an error reply the SuperLink makes up for an unreachable node carries the
            SuperLink's own ID as its source; it is named by the node it stands for).
    """

    round: int
    accuracy: float | None
    loss: float | None
    client_accuracy: float | None
    sampled: int
    replies: int
    accepted: int
    rejected: tuple[tuple[int, str], ...]
    bytes_down: int
    bytes_up: int
    seconds: float
    asked: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["rejected"] = [list(r) for r in self.rejected]
        payload["asked"] = list(self.asked)
        return payload

    def summary(self, rounds: int | None = None) -> str:
        """One log line: devices asked, answered, accepted, rejected (node ID: reason), accuracy, bytes."""
        of = f"/{rounds}" if rounds else ""
        rejected = "; ".join(f"node {node}: {reason}" for node, reason in self.rejected)
        accuracy = "-" if self.accuracy is None else f"{self.accuracy:.4f}"
        devices = "-" if self.client_accuracy is None else f"{self.client_accuracy:.4f}"
        return (
            f"round {self.round}{of}: {self.sampled} device(s) asked {list(self.asked)}, {self.replies} "
            f"answered, {self.accepted} accepted, {len(self.rejected)} rejected"
            + (f" [{rejected}]" if rejected else "")
            + f"; accuracy {accuracy} (devices' own {devices}); {self.bytes_down} bytes down, "
            f"{self.bytes_up} bytes up; {self.seconds:.1f} s"
        )


@dataclass(frozen=True, eq=False)
class ServerOutcome:
    """What :func:`run_server` ends with: the round records and the final global shared tensors."""

    rounds: tuple[RoundRecord, ...]
    arrays: dict[str, np.ndarray]


def _wait_for_nodes(grid: Grid, wanted: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() >= deadline:
            return nodes
        logger.info("waiting for devices: %d connected, %d wanted", len(nodes), wanted)
        time.sleep(_NODE_WAIT_S)


def _asked_node(reply: Message, asked: dict[str, int], sampled: set[int]) -> int:
    """The node a reply answers for: its source, or (for a reply the SuperLink made up) the node asked."""
    source = int(reply.metadata.src_node_id)
    if source in sampled:
        return source
    return asked.get(reply.metadata.reply_to_message_id, source)


def _weighted_metric(values: list[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in values)
    return sum(v * w for v, w in values) / total if total > 0 else None


def run_server(
    grid: Grid,
    config: FederatedConfig,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    min_nodes: int = 1,
    node_wait_s: float | None = None,
) -> ServerOutcome:
    """The server's round loop (see the module docstring): one record per round and the final tensors.

    Before each round it waits up to ``node_wait_s`` (default ``config.round_timeout_s``) for
    ``min_nodes`` devices, then goes on with those connected; replies are awaited ``round_timeout_s``.
    """
    wait_s = config.round_timeout_s if node_wait_s is None else float(node_wait_s)
    torch.manual_seed(config.seed)
    prepared = build_model(config)
    spec = tensor_spec(prepared, personalised=config.personalised)
    statistics = statistic_names(prepared, personalised=config.personalised)
    digest = backbone_digest(prepared)
    split = load_split(config, prepared)
    tensors = prepared.trainable_tensors()
    global_arrays = to_numpy({k: tensors[k] for k in spec})
    compression = config.compression_obj
    if compression.kind == "topk" and compression.error_feedback and config.optimizer == "adam":
        logger.warning(
            "top-k uplink with error feedback and Adam on the devices: Adam's normalised steps can make the "
            "residuals grow round after round, and in some settings accuracy collapses (measurements in "
            "federated.compression); check the run against compression='int8', which needs no feedback"
        )
    server_step = ServerMomentum(lr=config.server_lr, momentum=config.server_momentum, plain=statistics)
    rng = random.Random(config.seed)
    records: list[RoundRecord] = []
    for server_round in range(1, config.rounds + 1):
        start = time.perf_counter()
        nodes = _wait_for_nodes(grid, min_nodes, wait_s)
        if not nodes:
            raise FederatedError(f"no device connected within {wait_s:g} s")
        count = max(1, math.ceil(config.fraction_train * len(nodes)))
        sampled = sorted(rng.sample(nodes, count))
        instruction = ConfigRecord(
            {"server-round": server_round, "federation": config.to_json(), "backbone": digest}
        )
        broadcast = to_record(downlink_arrays(global_arrays, config.downlink))
        messages = [
            Message(
                content=RecordDict({ARRAYS_RECORD: broadcast, CONFIG_RECORD: instruction}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(server_round),
            )
            for node in sampled
        ]
        bytes_down = sum(content_bytes(m.content) for m in messages)
        logger.info(
            "round %d/%d: asking %d of %d connected device(s): %s",
            server_round,
            config.rounds,
            len(sampled),
            len(nodes),
            sampled,
        )
        replies = list(grid.send_and_receive(messages, timeout=config.round_timeout_s))
        bytes_up = sum(content_bytes(r.content) for r in replies if r.has_content())
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        answered_by = {id(r): _asked_node(r, asked, set(sampled)) for r in replies}
        # An error reply (the node is unreachable, its ClientApp failed) is named by the node asked: the
        # SuperLink makes up the reply for an unreachable node with its own ID as the source.
        failed = tuple(
            (answered_by[id(r)], f"error reply: {r.error.reason}") for r in replies if r.has_error()
        )
        for node, reason in failed:
            logger.warning("round %d: rejected the reply of node %s: %s", server_round, node, reason)
        report = validate_replies(
            [r for r in replies if not r.has_error()],
            spec=spec,
            compression=compression,
            norm_factor=config.norm_factor,
            max_examples=len(split.pool),
            statistics=statistics,
        )
        accepted = report.accepted
        silent = sorted(set(sampled) - set(answered_by.values()))
        if len(accepted) >= config.min_replies:
            mean = weighted_average([c.update for c in accepted], [c.num_examples for c in accepted])
            global_arrays = server_step.step(global_arrays, mean)
        else:
            logger.warning(
                "round %d: %d valid replies (%d needed); the global model is unchanged",
                server_round,
                len(accepted),
                config.min_replies,
            )
        accuracy = loss = None
        if not config.personalised:
            prepared.load_trainable({k: torch.from_numpy(np.array(v)) for k, v in global_arrays.items()})
            result = evaluate(prepared, split.test)
            accuracy, loss = result.accuracy, result.loss
        client_accuracy = _weighted_metric(
            [
                (c.metrics["accuracy-after"], c.metrics.get("test-samples", 1.0))
                for c in accepted
                if "accuracy-after" in c.metrics
            ]
        )
        record = RoundRecord(
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            client_accuracy=client_accuracy,
            sampled=len(sampled),
            replies=len(replies),
            accepted=len(accepted),
            rejected=(
                failed
                + tuple((r.node_id, r.reason) for r in report.rejected)
                + tuple((node, "no reply") for node in silent)
            ),
            bytes_down=bytes_down,
            bytes_up=bytes_up,
            seconds=time.perf_counter() - start,
            asked=tuple(sampled),
        )
        logger.info("%s", record.summary(config.rounds))
        records.append(record)
        if on_round is not None:
            on_round(record)
    return ServerOutcome(tuple(records), global_arrays)


def make_server_app(
    config: FederatedConfig | None = None,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    min_nodes: int | None = None,
) -> ServerApp:
    """A ServerApp running :func:`run_server`.

    Args:
        config: the federation; None reads it from the run config (``flwr run``, ``[tool.flwr.app.config]``
            in kebab-case, see :meth:`FederatedConfig.to_run_config`).
        on_round: called with each :class:`RoundRecord` (progress bars, collecting results).
        on_error: called with an exception that ends the run (Flower itself only logs it).
        min_nodes: devices to wait for before each round (default: run config ``min-nodes``, else 1).

    The run config may also set ``node-wait-s``: how long to wait for ``min-nodes`` devices before each
    round (default ``round-timeout-s``). If the run config has ``results-path``, the rounds so far are
    written there as JSON after every round (atomically, see :func:`write_results`). Each round is logged
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
            raise ConfigError(f"min-nodes must be a positive int, got {wanted!r}")
        node_wait = context.run_config.get("node-wait-s")
        if node_wait is not None and (
            isinstance(node_wait, bool) or not isinstance(node_wait, int | float) or node_wait < 0
        ):
            raise ConfigError(f"node-wait-s must be a number >= 0, got {node_wait!r}")
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
