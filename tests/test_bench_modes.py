"""Smoke test of bench/modes.py: it runs, its JSON has the documented shape, and its figures relate as they
must whatever the machine (no timing is checked: the step-time ratios are only required to exist)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

MODES = ("exact", "2bit", "int8", "recompute")


@pytest.mark.integration
def test_quick_bench_reports_accuracy_per_mode_against_exact_and_step_time_against_stock(
    run_bench: Callable[..., dict[str, Any]],
) -> None:
    result = run_bench("modes.py", "--quick")
    config = result["config"]
    assert config["quick"] is True and config["seeds"] == [0] and config["threads"] == 1
    assert config["transfers"] == {"vit": ["bias"], "silu_cnn": ["bias"]}
    assert list(config["modes"]) == list(MODES)

    rows = {r["model"]: r for r in result["accuracy"]}
    assert set(rows) == {"vit", "silu_cnn"}
    for model, row in rows.items():
        assert row["skipped"] is None and row["epochs"] == 1 and row["scheme"] == "bias", model
        exact = row["exact"]
        assert exact["diff"] == [0.0] and exact["diff_mean"] == 0.0
        for mode in MODES:
            figures = row[mode]
            # GELU (ViT) and SiLU (CNN) compress, and both have blocks to recompute: every mode applied.
            assert figures["applied"] is True, (model, mode)
            assert len(figures["accuracy"]) == 1 and 0.0 <= figures["accuracy_mean"] <= 1.0
            assert figures["accuracy_worst"] == figures["accuracy_mean"]
            assert figures["diff"] == [figures["accuracy"][0] - exact["accuracy"][0]]
            assert math.isclose(figures["diff_mean"], figures["diff"][0])
        # What one step keeps: 2 bits per element below 8 bits below the exact float inputs.
        assert 0 < row["2bit"]["activation_bytes"] < row["int8"]["activation_bytes"]
        assert row["int8"]["activation_bytes"] < exact["activation_bytes"]
    vit = rows["vit"]
    assert 0 < vit["recompute"]["activation_bytes"] < vit["exact"]["activation_bytes"]

    times = {r["model"]: r for r in result["time"]}
    assert set(times) == {"transformers/vit", "transformers/bert"}
    for name, row in times.items():
        assert row["reps"] == 2 and row["scheme"] == "bias", name
        assert row["stock"]["time_ratio"] == 1.0 and row["stock"]["x_less_kept"] == 1.0
        assert row["stock"]["compress"] is None and row["stock"]["recomputed_blocks"] == 0
        for mode in MODES:
            assert row[mode]["time_ratio"] > 0 and row[mode]["step_cpu_ms"] > 0, (name, mode)
            assert math.isclose(
                row[mode]["x_less_kept"], row["stock"]["activation_bytes"] / row[mode]["activation_bytes"]
            )
        assert row["2bit"]["compress"] == "2bit" and row["int8"]["compress"] == "int8"
        assert row["recompute"]["recomputed_blocks"] == 2
        # Each lossy mode keeps less than the exact ops, which keep no more than stock; recompute most of all.
        kept = {v: row[v]["activation_bytes"] for v in ("stock", *MODES)}
        assert kept["2bit"] < kept["int8"] < kept["exact"] <= kept["stock"], (name, kept)
        assert kept["recompute"] < kept["2bit"], (name, kept)
    assert set(result["targets_hold"]) == {"accuracy_2bit", "time_2bit", "time_recompute"}
    assert all(isinstance(v, bool) for v in result["targets_hold"].values())
