"""Prequential ("test, then train") scoring: a learner's counters and what one observed batch scored.

Each batch of a stream is classified *before* the learner trains on it, so its accuracy and loss
estimate how well the learner does on data it has not yet seen (Dawid 1984, "Present Position and
Potential Developments: Some Personal Views: Statistical Theory: The Prequential Approach"; Gama et al.
2013, "On Evaluating Stream Learning Algorithms").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["LearnerState", "ObserveResult", "count_hits"]


def count_hits(logits: Tensor, y: Tensor) -> int:
    """How many rows of ``logits`` have their largest entry at the label ``y`` (top-1 hits)."""
    return int((logits.detach().argmax(-1) == y).sum())


@dataclass
class LearnerState:
    """Counters and running metrics (saved with the learner).

    Attributes:
        samples_seen: stream position: samples passed to :meth:`Learner.observe` (skipped ones included).
        trained_samples: new samples trained on (replayed ones not counted).
        correct: prequential hits: new samples classified right before the update.
        train_seconds: wall time spent in :meth:`Learner.observe`.
        accuracy_matrix / baseline: rows recorded with :meth:`Learner.record_accuracies`.
    """

    samples_seen: int = 0
    trained_samples: int = 0
    batches: int = 0
    optimizer_steps: int = 0
    skipped_batches: int = 0
    experiences: int = 0
    correct: int = 0
    drifts: int = 0
    train_seconds: float = 0.0
    lr_boost_factor: float = 1.0
    lr_boost_remaining: int = 0
    accuracy_matrix: list[list[float]] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)

    @property
    def prequential_accuracy(self) -> float:
        """Share of new samples classified right before training on them."""
        return self.correct / self.trained_samples if self.trained_samples else 0.0

    @property
    def samples_per_second(self) -> float:
        """New samples trained per second of :meth:`Learner.observe` (replay steps included)."""
        return self.trained_samples / self.train_seconds if self.train_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ObserveResult:
    """One :meth:`Learner.observe`: prequential loss/accuracy of the new batch (None when skipped)."""

    samples: int
    loss: float | None
    accuracy: float | None
    skipped: bool = False
    reason: str | None = None
    grown_to: int | None = None
    drift: bool = False
