"""Server-side validation of every device reply before it is aggregated.

A reply is rejected (logged and counted, never a crash) when it is an error, misses a record, carries
wrong keys, shapes or dtypes for the codec, NaN or Inf, a sample count that is not a positive integer,
or an update whose L2 norm is more than ``norm_factor`` times the *lower median* of the norms in the
round. The lower median (the smaller middle value) keeps one poisoned reply out even among two, and a
robust reference cannot be dragged up by a few huge updates (cf. the coordinate-wise median of Yin et
al., "Byzantine-Robust Distributed Learning", ICML 2018). The round goes on with the rest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict

from federated.aggregation import update_norm
from federated.compression import Compression
from federated.errors import PayloadError
from federated.records import TensorSpec, decode_update

__all__ = [
    "Candidate",
    "Rejection",
    "ValidationReport",
    "check_update",
    "norm_outliers",
    "screen_content",
    "validate_replies",
]

logger = logging.getLogger(__name__)

UPDATE_RECORD = "update"
AUX_RECORD = "aux"
METRICS_RECORD = "metrics"
NUM_EXAMPLES = "num-examples"


@dataclass(frozen=True, eq=False)
class Candidate:
    """A structurally valid reply: the decoded update, its sample count, its norm and its metrics."""

    node_id: int
    update: dict[str, np.ndarray]
    num_examples: int
    norm: float
    metrics: dict[str, float]


@dataclass(frozen=True)
class Rejection:
    """A reply left out of aggregation, and why."""

    node_id: int
    reason: str


@dataclass(frozen=True, eq=False)
class ValidationReport:
    """What a round's replies came to."""

    accepted: tuple[Candidate, ...]
    rejected: tuple[Rejection, ...]


def check_update(update: Mapping[str, np.ndarray], spec: TensorSpec) -> str | None:
    """The reason ``update`` does not fit ``spec`` (keys, shapes, dtypes, finiteness), or None if it does."""
    if sorted(update) != sorted(spec):
        unexpected = sorted(set(update) - set(spec))
        missing = sorted(set(spec) - set(update))
        return f"wrong keys: unexpected {unexpected[:3]}, missing {missing[:3]}"
    for name in sorted(spec):
        shape, dtype = spec[name]
        value = update[name]
        if tuple(value.shape) != tuple(shape):
            return f"{name!r}: shape {tuple(value.shape)}, expected {tuple(shape)}"
        if value.dtype != dtype:
            return f"{name!r}: dtype {value.dtype}, expected {np.dtype(dtype)}"
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            return f"{name!r}: holds NaN or Inf"
    return None


def norm_outliers(norms: Sequence[float], factor: float) -> list[bool]:
    """Which norms exceed ``factor`` times the lower median of all ``norms`` (never with fewer than 2)."""
    if isinstance(factor, bool) or not isinstance(factor, int | float) or factor <= 1:
        raise PayloadError(f"norm factor must be > 1, got {factor!r}")
    if len(norms) < 2:
        return [False] * len(norms)
    ordered = sorted(norms)
    reference = ordered[(len(ordered) - 1) // 2]
    if reference <= 0:
        return [False] * len(norms)
    return [n > factor * reference for n in norms]


def screen_content(
    content: RecordDict,
    *,
    node_id: int,
    spec: TensorSpec,
    compression: Compression,
    max_examples: int,
    statistics: Collection[str] = (),
) -> Candidate | Rejection:
    """Decode and check one reply's content; every failure becomes a :class:`Rejection`.

    ``statistics`` names the running-statistics tensors (see :func:`federated.compression.codec_for`).
    """
    try:
        update = decode_update(
            content.get(UPDATE_RECORD), content.get(AUX_RECORD), spec, compression, statistics=statistics
        )
    except PayloadError as exc:
        return Rejection(node_id, f"malformed update: {exc}")
    reason = check_update(update, spec)
    if reason is not None:
        return Rejection(node_id, reason)
    metrics_record = content.get(METRICS_RECORD)
    if not isinstance(metrics_record, MetricRecord):
        return Rejection(node_id, f"no {METRICS_RECORD!r} MetricRecord")
    count = metrics_record.get(NUM_EXAMPLES)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= max_examples:
        return Rejection(node_id, f"{NUM_EXAMPLES} must be an int in 1..{max_examples}, got {count!r}")
    metrics = {
        k: float(v)
        for k, v in metrics_record.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    return Candidate(node_id, update, count, update_norm(update), metrics)


def validate_replies(
    replies: Iterable[Message],
    *,
    spec: TensorSpec,
    compression: Compression,
    norm_factor: float,
    max_examples: int,
    statistics: Collection[str] = (),
) -> ValidationReport:
    """Screen a round's replies: structure first, then norms among the structurally valid ones."""
    candidates: list[Candidate] = []
    rejected: list[Rejection] = []
    for reply in replies:
        node_id = int(reply.metadata.src_node_id)
        if reply.has_error():
            rejected.append(Rejection(node_id, f"error reply: {reply.error.reason}"))
            continue
        outcome = screen_content(
            reply.content,
            node_id=node_id,
            spec=spec,
            compression=compression,
            max_examples=max_examples,
            statistics=statistics,
        )
        (candidates if isinstance(outcome, Candidate) else rejected).append(outcome)  # type: ignore[arg-type]
    outliers = norm_outliers([c.norm for c in candidates], norm_factor)
    accepted: list[Candidate] = []
    reference = sorted(c.norm for c in candidates)[(len(candidates) - 1) // 2] if candidates else 0.0
    for candidate, outlier in zip(candidates, outliers, strict=True):
        if outlier:
            rejected.append(
                Rejection(
                    candidate.node_id,
                    f"update norm {candidate.norm:.3g} > {norm_factor:g} x lower median {reference:.3g}",
                )
            )
        else:
            accepted.append(candidate)
    for rejection in rejected:
        logger.warning("rejected the reply of node %s: %s", rejection.node_id, rejection.reason)
    return ValidationReport(tuple(accepted), tuple(rejected))
