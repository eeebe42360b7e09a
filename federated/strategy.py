"""The server: Flower's own ``FedAvgM`` / ``FedProx`` strategies, with only what is ours overridden.

Flower's ``Strategy.start`` drives the rounds (configure, send and receive, aggregate, evaluate); there is
no round loop here. :func:`make_strategy` picks the base Flower ships for the federation:
:class:`SparseFedProx` (Flower's ``FedProx``, which also tells devices ``proximal-mu``) when
``aggregation="fedprox"``, else :class:`SparseFedAvgM` (Flower's ``FedAvgM``, plain FedAvg at server lr 1
and momentum 0). Both override the same few steps, :class:`SparseUpdates`:

- ``configure_train``: wait for devices, sample them with the federation's seeded generator, send the
  global shared tensors at the downlink precision with the federation's instruction (and, with
  ``ship_backbone``, the frozen backbone to each device that has not confirmed it), count the bytes;
- ``aggregate_train``: validate every reply (:mod:`federated.validation`), decode the compressed sparse
  deltas, average them by samples and step with the server's momentum (:func:`federated.aggregation.
  server_step`); count the bytes. Flower's own ``FedAvg``/``FedAvgM`` aggregation cannot be used as it
  is: it averages whole weights carried in one ``ArrayRecord`` per reply, where devices send compressed
  deltas in two, and ``FedAvgM`` would push running statistics and integer counters with momentum;
- the server-side evaluation (``evaluate_fn`` of ``start``): the global model on the server's test set
  (or, in personalised mode, the devices' own accuracies), and the round's :class:`RoundRecord`.

Devices do not run a federated evaluation round (``fraction_evaluate=0``), as before.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedProx

from federated.aggregation import server_step, weighted_average
from federated.backbone import BACKBONE_RECORD, backbone_record, confirmed_backbone, reported_state_note
from federated.client import backbone_digest, build_model, load_split, statistic_names, tensor_spec
from federated.config import FederatedConfig
from federated.errors import FederatedError
from federated.records import content_bytes, downlink_arrays, from_record, record_bytes, to_numpy, to_record
from federated.roster import Roster
from federated.validation import NUM_EXAMPLES, validate_replies
from ondevice.trainer import evaluate

__all__ = ["RoundRecord", "SparseFedAvgM", "SparseFedProx", "SparseUpdates", "make_strategy"]

logger = logging.getLogger(__name__)

ARRAYS_RECORD = "arrays"
CONFIG_RECORD = "config"
_NODE_WAIT_S = 1.0


@dataclass(frozen=True)
class RoundRecord:
    """One round, as the server saw it.

    Attributes:
        accuracy: the global model's accuracy on the server's test set (None in personalised mode).
        client_accuracy: sample-weighted mean of the accepted devices' local test accuracy after training.
        bytes_down / bytes_up: array bytes of the messages sent / replies received this round.
        asked: the node IDs sampled (sent a train message) this round.
        backbone_sent: the node IDs that were sent the frozen backbone this round (``ship_backbone``).
        backbone_bytes: array bytes of those backbones (part of ``bytes_down``).
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
    backbone_sent: tuple[int, ...] = ()
    backbone_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["rejected"] = [list(r) for r in self.rejected]
        payload["asked"] = list(self.asked)
        payload["backbone_sent"] = list(self.backbone_sent)
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
            + f"; accuracy {accuracy} (devices' own {devices}); {self.bytes_down} bytes down"
            + (
                f" ({self.backbone_bytes} of them the backbone, to {list(self.backbone_sent)})"
                if self.backbone_sent
                else ""
            )
            + f", {self.bytes_up} bytes up; {self.seconds:.1f} s"
        )


@dataclass
class _Round:
    """What the server learns about the round in progress, from sampling to evaluation."""

    number: int
    started: float
    sampled: tuple[int, ...]
    messages: list[Message]
    bytes_down: int
    replies: int = 0
    accepted: int = 0
    rejected: tuple[tuple[int, str], ...] = ()
    bytes_up: int = 0
    client_accuracy: float | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    backbone_sent: tuple[int, ...] = ()
    backbone_bytes: int = 0


def _wait_for_nodes(
    grid: Grid, roster: Roster, wanted: int, timeout_s: float, server_round: int
) -> list[int]:
    """The connected devices that still answer, once ``wanted`` of them are there or ``timeout_s`` passed.

    When none of them is there in time but some connected devices stopped answering earlier, those are
    returned: asking them is better than ending the run.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        connected = sorted(grid.get_node_ids())
        roster.observe(connected, server_round)
        ready = roster.available(connected)
        if len(ready) >= wanted or time.monotonic() >= deadline:
            return ready or connected
        logger.info(
            "round %d: waiting for devices: %d connected and answering, %d wanted (up to %g s more)",
            server_round,
            len(ready),
            wanted,
            max(0.0, deadline - time.monotonic()),
        )
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


class SparseUpdates(FedAvg):
    """What the server does its own way on top of a Flower strategy (see the module docstring).

    A mixin: :class:`SparseFedAvgM` and :class:`SparseFedProx` put it before Flower's ``FedAvgM`` or
    ``FedProx``; it is not used alone. Pass :meth:`evaluate_round` as ``evaluate_fn`` to ``start``.

    Attributes:
        config: the federation.
        initial_arrays: the global shared tensors the run starts from (sorted keys).
        records: one :class:`RoundRecord` per round completed so far.
    """

    config: FederatedConfig
    initial_arrays: dict[str, np.ndarray]
    records: list[RoundRecord]

    def _bind(
        self,
        config: FederatedConfig,
        *,
        on_round: Callable[[RoundRecord], None] | None,
        min_nodes: int,
        node_wait_s: float | None,
    ) -> None:
        """Build the server's model, split and shared tensors (called by the subclasses' ``__init__``)."""
        self.config = config
        self._on_round = on_round
        self._min_nodes = min_nodes
        self._node_wait_s = config.round_timeout_s if node_wait_s is None else float(node_wait_s)
        torch.manual_seed(config.seed)
        self._prepared = build_model(config)
        self._spec = tensor_spec(self._prepared, personalised=config.personalised)
        self._statistics = statistic_names(self._prepared, personalised=config.personalised)
        self._digest = backbone_digest(self._prepared)
        # ship_backbone: the frozen tensors as held, and the nodes whose last reply confirmed them.
        self._backbone = backbone_record(self._prepared) if config.ship_backbone else None
        self._has_backbone: set[int] = set()
        self._split = load_split(config, self._prepared)
        tensors = self._prepared.trainable_tensors()
        self.initial_arrays = to_numpy({k: tensors[k] for k in self._spec})
        compression = config.compression_obj
        if compression.kind == "topk" and compression.error_feedback and config.optimizer == "adam":
            logger.warning(
                "top-k uplink with error feedback and Adam on the devices: Adam's normalised steps can make "
                "the residuals grow round after round, and in some settings accuracy collapses (measurements "
                "in federated.compression); check the run against compression='int8', which needs no feedback"
            )
        # Devices run no federated evaluation round; the server evaluates (evaluate_round). Set here rather
        # than passed to Flower's __init__, which would warn that evaluation is skipped.
        self.fraction_evaluate = 0.0
        self.min_evaluate_nodes = 0
        self._rng = random.Random(config.seed)
        self._velocity: dict[str, np.ndarray] = {}
        self._round: _Round | None = None
        self.roster = Roster()
        self._gathered = False  # the first round's wait for min_nodes is done
        self.records = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample devices with the federation's seed and send each the global tensors and instruction.

        Before the first round it waits up to ``node_wait_s`` for ``min_nodes`` devices, then goes on with
        those connected. Later rounds ask the connected devices that still answer (:mod:`federated.roster`)
        without waiting, unless none is there: then it waits up to ``node_wait_s`` for one. The entries
        of ``config`` (Flower's train config, e.g. FedProx's ``proximal-mu``) ride along.

        Raises:
            FederatedError: no device connected in time.
        """
        started = time.perf_counter()
        wanted = 1 if self._gathered else self._min_nodes
        nodes = _wait_for_nodes(grid, self.roster, wanted, self._node_wait_s, server_round)
        self._gathered = True
        if not nodes:
            raise FederatedError(
                f"round {server_round}: no device connected within node-wait-s={self._node_wait_s:g} s; "
                "check that the SuperNodes run (`ondevice fleet status`) and reach the SuperLink"
            )
        count = max(1, math.ceil(self.config.fraction_train * len(nodes)))
        sampled = sorted(self._rng.sample(nodes, count))
        instruction = ConfigRecord(
            {
                **config,
                "server-round": server_round,
                "federation": self.config.to_json(),
                "backbone": self._digest,
            }
        )
        global_arrays = from_record(arrays)
        broadcast = to_record(downlink_arrays(global_arrays, self.config.downlink))
        backbone_to = (
            tuple(node for node in sampled if node not in self._has_backbone) if self._backbone else ()
        )
        messages = []
        for node in sampled:
            content = RecordDict({ARRAYS_RECORD: broadcast, CONFIG_RECORD: instruction})
            if self._backbone is not None and node in backbone_to:
                content[BACKBONE_RECORD] = self._backbone
            messages.append(
                Message(
                    content=content,
                    dst_node_id=node,
                    message_type=MessageType.TRAIN,
                    group_id=str(server_round),
                )
            )
        backbone_bytes = len(backbone_to) * record_bytes(self._backbone) if self._backbone else 0
        if backbone_to:
            logger.info(
                "round %d: shipping the frozen backbone (%s, %d bytes) to %d device(s): %s",
                server_round,
                self.config.frozen_weights,
                backbone_bytes // len(backbone_to),
                len(backbone_to),
                list(backbone_to),
            )
        self._round = _Round(
            number=server_round,
            started=started,
            sampled=tuple(sampled),
            messages=messages,
            bytes_down=sum(content_bytes(m.content) for m in messages),
            arrays=global_arrays,
            backbone_sent=backbone_to,
            backbone_bytes=backbone_bytes,
        )
        logger.info(
            "round %d/%d: asking %d of %d connected device(s): %s",
            server_round,
            self.config.rounds,
            len(sampled),
            len(nodes),
            sampled,
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, average the accepted sparse deltas by samples and take the server's step.

        Returns the new global tensors, or None (the model stays as it is) when fewer than
        ``min_replies`` replies are valid; Flower keeps the arrays it has then. No train metrics.
        """
        current = self._round
        if current is None or current.number != server_round:
            raise FederatedError(f"aggregate_train for round {server_round} without its configure_train")
        replies = list(replies)
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        sampled = set(current.sampled)
        asked = {
            m.metadata.message_id: m.metadata.dst_node_id for m in current.messages if m.metadata.message_id
        }
        answered_by = {id(r): _asked_node(r, asked, sampled) for r in replies}
        for reply in replies:  # a node holds the server's backbone while its replies say so
            note = reported_state_note(reply)
            if note is not None:
                logger.warning("round %d: node %s: %s", server_round, answered_by[id(reply)], note)
            if confirmed_backbone(reply) == self._digest:
                self._has_backbone.add(answered_by[id(reply)])
            else:
                self._has_backbone.discard(answered_by[id(reply)])
        # An error reply (the node is unreachable, its ClientApp failed) is named by the node asked: the
        # SuperLink makes up the reply for an unreachable node with its own ID as the source.
        failed = tuple((answered_by[id(r)], f"error reply: {r.error.reason}") for r in errors)
        for node, reason in failed:
            logger.warning("round %d: rejected the reply of node %s: %s", server_round, node, reason)
        for reply in replies:  # a reply the SuperLink made up means the node is gone; any other, it answers
            node = answered_by[id(reply)]
            if int(reply.metadata.src_node_id) == node:
                self.roster.answered(node)
            else:
                why = (reply.error.reason or "no reason given") if reply.has_error() else "no content"
                self.roster.stopped(node, f"the SuperLink answered for it: {why}", server_round)
        report = validate_replies(
            valid,
            spec=self._spec,
            compression=self.config.compression_obj,
            norm_factor=self.config.norm_factor,
            max_examples=len(self._split.pool),
            statistics=self._statistics,
        )
        accepted = report.accepted
        silent = sorted(sampled - set(answered_by.values()))
        for node in silent:
            self.roster.stopped(
                node, f"no reply within round-timeout-s={self.config.round_timeout_s:g} s", server_round
            )
        current.replies = len(replies)
        current.accepted = len(accepted)
        current.bytes_up = sum(content_bytes(r.content) for r in replies if r.has_content())
        current.rejected = (
            failed
            + tuple((r.node_id, r.reason) for r in report.rejected)
            + tuple((node, "no reply") for node in silent)
        )
        current.client_accuracy = _weighted_metric(
            [
                (c.metrics["accuracy-after"], c.metrics.get("test-samples", 1.0))
                for c in accepted
                if "accuracy-after" in c.metrics
            ]
        )
        if len(accepted) < self.config.min_replies:
            logger.warning(
                "round %d: %d valid replies (%d needed); the global model is unchanged",
                server_round,
                len(accepted),
                self.config.min_replies,
            )
            return None, None
        mean = weighted_average([c.update for c in accepted], [c.num_examples for c in accepted])
        step = server_step(
            current.arrays,
            mean,
            self._velocity,
            lr=self.config.server_lr,
            momentum=self.config.server_momentum,
            plain=self._statistics,
        )
        self._velocity = step.velocity
        current.arrays = step.arrays
        return to_record(step.arrays), None

    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """The server-side end of a round (``evaluate_fn`` of ``start``): evaluate, record, report.

        Round 0 (the starting model) is not evaluated. The global model is evaluated on the server's test
        set (not in personalised mode, where the head stays on the devices); the round's
        :class:`RoundRecord` is appended to :attr:`records` and passed to ``on_round``.
        """
        current = self._round
        if server_round == 0 or current is None or current.number != server_round:
            return None
        accuracy = loss = None
        if not self.config.personalised:
            self._prepared.load_trainable(
                {k: torch.from_numpy(np.array(v)) for k, v in from_record(arrays).items()}
            )
            result = evaluate(self._prepared, self._split.test)
            accuracy, loss = result.accuracy, result.loss
        record = RoundRecord(
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            client_accuracy=current.client_accuracy,
            sampled=len(current.sampled),
            replies=current.replies,
            accepted=current.accepted,
            rejected=current.rejected,
            bytes_down=current.bytes_down,
            bytes_up=current.bytes_up,
            seconds=time.perf_counter() - current.started,
            asked=current.sampled,
            backbone_sent=current.backbone_sent,
            backbone_bytes=current.backbone_bytes,
        )
        self._round = None
        self.records.append(record)
        if self._on_round is not None:
            self._on_round(record)
        if accuracy is None or loss is None:
            return None
        return MetricRecord({"accuracy": accuracy, "loss": loss})


def _flower_settings(config: FederatedConfig, min_nodes: int) -> dict[str, Any]:
    """Flower's settings, for its summary: ``configure_train`` samples ``fraction_train`` itself."""
    return {
        "fraction_train": config.fraction_train,
        "min_train_nodes": 1,
        "min_available_nodes": min_nodes,
        "weighted_by_key": NUM_EXAMPLES,
        "arrayrecord_key": ARRAYS_RECORD,
        "configrecord_key": CONFIG_RECORD,
    }


class SparseFedAvgM(SparseUpdates, FedAvgM):
    """Flower's ``FedAvgM`` (Hsu et al. 2019) on sparse, compressed, validated updates.

    Server lr and momentum come from the federation; lr 1 and momentum 0 is FedAvg. See
    :class:`SparseUpdates` for what is overridden.
    """

    def __init__(
        self,
        config: FederatedConfig,
        *,
        on_round: Callable[[RoundRecord], None] | None = None,
        min_nodes: int = 1,
        node_wait_s: float | None = None,
    ) -> None:
        FedAvgM.__init__(
            self,
            **_flower_settings(config, min_nodes),
            server_learning_rate=config.server_lr,
            server_momentum=config.server_momentum,
        )
        self._bind(config, on_round=on_round, min_nodes=min_nodes, node_wait_s=node_wait_s)


class SparseFedProx(SparseUpdates, FedProx):
    """Flower's ``FedProx`` (Li et al. 2020) on sparse, compressed, validated updates.

    The devices add the proximal term themselves (:func:`federated.aggregation.proximal_term`, mu from
    the federation); as ``FedProx`` does, the train instruction also carries ``proximal-mu``. A server
    lr or momentum in the federation applies as with :class:`SparseFedAvgM`.
    """

    def __init__(
        self,
        config: FederatedConfig,
        *,
        on_round: Callable[[RoundRecord], None] | None = None,
        min_nodes: int = 1,
        node_wait_s: float | None = None,
    ) -> None:
        FedProx.__init__(self, **_flower_settings(config, min_nodes), proximal_mu=config.proximal_mu)
        self._bind(config, on_round=on_round, min_nodes=min_nodes, node_wait_s=node_wait_s)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As ``FedProx.configure_train``: ``proximal-mu`` in the instruction, then ours."""
        config["proximal-mu"] = self.proximal_mu
        return super().configure_train(server_round, arrays, config, grid)


def make_strategy(
    config: FederatedConfig,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    min_nodes: int = 1,
    node_wait_s: float | None = None,
) -> SparseUpdates:
    """The server's strategy for ``config``: :class:`SparseFedProx` for ``aggregation="fedprox"``, else
    :class:`SparseFedAvgM`. Run it with ``strategy.start(..., evaluate_fn=strategy.evaluate_round)``."""
    kind = SparseFedProx if config.aggregation == "fedprox" else SparseFedAvgM
    return kind(config, on_round=on_round, min_nodes=min_nodes, node_wait_s=node_wait_s)
