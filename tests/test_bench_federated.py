"""bench/federated.py's protocol, without running a federation: the recorded winners are the best of the
recorded tuning figures, both tuned rows had the same grid on seeds that are never reported, every reported
row is a valid configuration, and the issue's figures are judged as stated."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest

import federated

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "federated.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_federated", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_both_tuned_rows_had_the_whole_grid_on_the_tuning_seeds(bench: ModuleType) -> None:
    grid = {(lr, agg) for lr in bench.LR_GRID for agg in bench.AGGREGATIONS}
    for row in bench.TUNED_ROWS:
        points = [p for p in bench.TUNING if p["row"] == row]
        assert {(p["lr"], p["aggregation"]) for p in points} == grid, row
        for p in points:
            assert len(p["accuracy"]) == len(bench.TUNE_SEEDS)
            assert p["mean"] == pytest.approx(statistics.fmean(p["accuracy"]))


def test_recorded_winners_are_the_best_mean_of_the_recorded_grid(bench: ModuleType) -> None:
    best = bench.winners(bench.TUNING)
    for row, tuned in bench.TUNED.items():
        assert (tuned["lr"], tuned["aggregation"]) == (best[row]["lr"], best[row]["aggregation"]), row


def test_tuning_seeds_are_not_reported_seeds(bench: ModuleType) -> None:
    assert not set(bench.TUNE_SEEDS) & set(range(5))


def test_every_reported_row_is_a_valid_configuration(bench: ModuleType) -> None:
    roles = [v.role for v in bench.variants()]
    assert {"baseline", "full-same-codec", "claim", "uncompressed"} <= set(roles)
    for variant in bench.variants():
        federated.FederatedConfig(**{**bench.COMMON, **variant.overrides, "seed": 0})


@pytest.mark.parametrize(
    ("gaps", "fp32_ratio", "fp16_ratio", "met"),
    [
        ([1.0, 2.5, 0.0], 25.0, 12.5, True),
        ([1.0, 3.5, 0.0], 25.0, 12.5, False),  # one seed beyond 3 points
        ([2.5, 2.5, 2.5], 25.0, 12.5, False),  # the mean beyond 2 points
        ([0.0, 0.0, 0.0], 25.0, 9.5, False),  # too few fewer bytes than fp16 full
    ],
)
def test_claim_figures(
    bench: ModuleType, gaps: list[float], fp32_ratio: float, fp16_ratio: float, met: bool
) -> None:
    claim = {
        "role": "claim",
        "gap_points": gaps,
        "gap_mean_points": statistics.fmean(gaps),
        "gap_worst_points": max(gaps),
        "bytes_per_round": 1.0,
        "bytes_ratio_vs_full": fp32_ratio,
    }
    fp16_full = {"role": "full-same-codec", "bytes_per_round": fp16_ratio}
    assert bench.claim_figures([fp16_full, claim])["met"] is met
