"""Continual-learning metrics over the accuracy matrix, as pure functions.

Convention (Lopez-Paz & Ranzato, NeurIPS 2017, "Gradient Episodic Memory", Sec. 5; forgetting as in
Chaudhry et al., ECCV 2018, "Riemannian Walk", Sec. 4), written 0-indexed here:

- ``R[i][j]`` is the accuracy on the test set of experience ``j`` after training through experience
  ``i``; there are ``T`` experiences, so ``R`` is ``T x T`` and its last row ``R[T-1]`` is the final
  model.
- ``ACC = mean_j R[T-1][j]`` (average accuracy of the final model over all experiences).
- ``BWT = mean_{j < T-1} (R[T-1][j] - R[j][j])`` (negative: forgetting).
- ``FWT = mean_{j >= 1} (R[j-1][j] - b[j])`` where ``b[j]`` is the accuracy on experience ``j`` of the
  model *before it trained on the stream* (the prepared, pretrained model with its initial head), measured
  with the same accuracy function. In class-incremental streams the head has no row for classes not seen
  yet, so ``R[j-1][j]`` and ``b[j]`` are both 0 and FWT is 0 by construction.
- ``forgetting_j = max_{i < T-1} R[i][j] - R[T-1][j]`` for ``j < T-1``: the drop from the *best* earlier
  accuracy (not the first), the max taken over all earlier rows; average forgetting is its mean over
  ``j < T-1``. It is never averaged over ``T`` (some libraries do).

Every function accepts any ``T x T`` sequence of sequences of floats (lists, tuples, numpy arrays).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ondevice.errors import ConfigError

__all__ = [
    "ContinualMetrics",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "forgetting",
    "forward_transfer",
]

Matrix = Sequence[Sequence[float]]


def _check(matrix: Matrix) -> list[list[float]]:
    rows = [[float(v) for v in row] for row in matrix]
    size = len(rows)
    if size == 0 or any(len(row) != size for row in rows):
        shape = [len(row) for row in rows]
        raise ConfigError(
            f"the accuracy matrix must be square T x T (row i: accuracies on every experience after "
            f"training through experience i), got row lengths {shape}"
        )
    if any(not math.isfinite(v) for row in rows for v in row):
        raise ConfigError("the accuracy matrix holds NaN or Inf; every R[i][j] must be a finite accuracy")
    return rows


def average_accuracy(matrix: Matrix) -> float:
    """ACC: mean accuracy of the final model over all experiences, ``mean_j R[T-1][j]``."""
    rows = _check(matrix)
    return sum(rows[-1]) / len(rows)


def backward_transfer(matrix: Matrix) -> float:
    """BWT: ``mean_{j < T-1} (R[T-1][j] - R[j][j])``; 0.0 for a single experience."""
    rows = _check(matrix)
    size = len(rows)
    if size < 2:
        return 0.0
    return sum(rows[-1][j] - rows[j][j] for j in range(size - 1)) / (size - 1)


def forward_transfer(matrix: Matrix, baseline: Sequence[float]) -> float:
    """FWT: ``mean_{j >= 1} (R[j-1][j] - baseline[j])``; 0.0 for a single experience.

    ``baseline[j]`` is the accuracy on experience ``j`` of the model before it saw the stream.
    """
    rows = _check(matrix)
    size = len(rows)
    base = [float(b) for b in baseline]
    if len(base) != size:
        raise ConfigError(f"baseline needs one accuracy per experience ({size}), got {len(base)}")
    if size < 2:
        return 0.0
    return sum(rows[j - 1][j] - base[j] for j in range(1, size)) / (size - 1)


def forgetting(matrix: Matrix) -> list[float]:
    """Per-experience forgetting ``max_{i < T-1} R[i][j] - R[T-1][j]`` for ``j < T-1`` (T-1 values)."""
    rows = _check(matrix)
    size = len(rows)
    return [max(rows[i][j] for i in range(size - 1)) - rows[-1][j] for j in range(size - 1)]


def average_forgetting(matrix: Matrix) -> float:
    """Mean of :func:`forgetting` over the first ``T-1`` experiences; 0.0 for a single experience."""
    values = forgetting(matrix)
    return sum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class ContinualMetrics:
    """ACC, BWT, FWT and forgetting of one accuracy matrix (see the module docstring for conventions)."""

    accuracy_matrix: tuple[tuple[float, ...], ...]
    baseline: tuple[float, ...]
    acc: float
    bwt: float
    fwt: float
    forgetting: tuple[float, ...]
    avg_forgetting: float

    @staticmethod
    def from_matrix(matrix: Matrix, baseline: Sequence[float] | None = None) -> ContinualMetrics:
        """Compute every metric; ``baseline`` defaults to zeros (a head that knows no class yet)."""
        rows = _check(matrix)
        base = tuple(float(b) for b in baseline) if baseline is not None else (0.0,) * len(rows)
        return ContinualMetrics(
            accuracy_matrix=tuple(tuple(row) for row in rows),
            baseline=base,
            acc=average_accuracy(rows),
            bwt=backward_transfer(rows),
            fwt=forward_transfer(rows, base),
            forgetting=tuple(forgetting(rows)),
            avg_forgetting=average_forgetting(rows),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists)."""
        payload = asdict(self)
        payload["accuracy_matrix"] = [list(row) for row in self.accuracy_matrix]
        payload["baseline"] = list(self.baseline)
        payload["forgetting"] = list(self.forgetting)
        return payload
