"""Metrics over the accuracy matrix, against hand-computed values."""

from __future__ import annotations

import pytest

from ondevice.continual import (
    ContinualMetrics,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    forgetting,
    forward_transfer,
)
from ondevice.errors import ConfigError

# R[i][j]: accuracy on experience j after training through experience i (T = 3).
R = [
    [0.9, 0.1, 0.2],
    [0.7, 0.8, 0.3],
    [0.6, 0.85, 0.95],
]
B = [0.1, 0.05, 0.1]


def test_hand_computed_matrix() -> None:
    assert average_accuracy(R) == pytest.approx((0.6 + 0.85 + 0.95) / 3)
    # BWT = ((0.6 - 0.9) + (0.85 - 0.8)) / 2
    assert backward_transfer(R) == pytest.approx((-0.3 + 0.05) / 2)
    # FWT = ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((0.1 - 0.05) + (0.3 - 0.1)) / 2
    assert forward_transfer(R, B) == pytest.approx((0.05 + 0.2) / 2)
    # forgetting_j = max over earlier rows - final: j=0: 0.9 - 0.6; j=1: max(0.1, 0.8) - 0.85 < 0
    assert forgetting(R) == pytest.approx([0.3, -0.05])
    assert average_forgetting(R) == pytest.approx(0.125)


def test_forgetting_takes_the_best_earlier_row_not_the_first() -> None:
    matrix = [[0.5, 0.0], [0.9, 0.9]]
    matrix3 = [[0.5, 0.0, 0.0], [0.9, 0.9, 0.0], [0.4, 0.8, 1.0]]
    assert forgetting(matrix) == pytest.approx([-0.4])
    assert forgetting(matrix3) == pytest.approx([0.5, 0.1])
    assert backward_transfer(matrix3) == pytest.approx(((0.4 - 0.5) + (0.8 - 0.9)) / 2)


def test_catastrophic_forgetting_matrix() -> None:
    matrix = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    metrics = ContinualMetrics.from_matrix(matrix)
    assert metrics.acc == pytest.approx(1 / 3)
    assert metrics.bwt == pytest.approx(-1.0)
    assert metrics.avg_forgetting == pytest.approx(1.0)
    assert metrics.fwt == 0.0
    assert metrics.to_dict()["accuracy_matrix"] == [list(r) for r in matrix]


def test_single_experience() -> None:
    assert backward_transfer([[0.7]]) == 0.0
    assert forward_transfer([[0.7]], [0.1]) == 0.0
    assert average_forgetting([[0.7]]) == 0.0


@pytest.mark.parametrize(
    ("matrix", "match"),
    [([], "square"), ([[1.0, 0.0]], "square"), ([[float("nan")]], "NaN")],
)
def test_rejects_bad_matrices(matrix: list[list[float]], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        average_accuracy(matrix)


def test_baseline_length_is_checked() -> None:
    with pytest.raises(ConfigError, match="one accuracy per experience"):
        forward_transfer(R, [0.0])
