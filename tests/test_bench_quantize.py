"""Smoke test of bench/quantize.py: it runs, its JSON has the documented shape, and its figures relate as
they must whatever the machine (no timing is checked: the step-time ratio is only required to exist)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

BYTE_KEYS = {
    "frozen_param_bytes",
    "param_bytes",
    "activation_bytes",
    "peak_bytes",
    "quantised_layer_weight_bytes",
}


@pytest.mark.integration
def test_quick_bench_reports_accuracy_bytes_peak_and_time_for_float_and_int8(
    run_bench: Callable[..., dict[str, Any]],
) -> None:
    result = run_bench("quantize.py", "--quick")
    config = result["config"]
    assert config["quick"] is True and config["seeds"] == [0] and config["threads"] == 1
    assert config["transfers"] == {"cnn": ["bias", "lite_residual", "lora"]}

    rows = {(r["model"], r["scheme"]): r for r in result["accuracy"]}
    assert set(rows) == {("cnn", "bias"), ("cnn", "lite_residual"), ("cnn", "lora")}
    assert "no linear layer" in rows["cnn", "lora"]["skipped"]  # LoRA has nothing to adapt in the cnn
    for key in (("cnn", "bias"), ("cnn", "lite_residual")):
        row = rows[key]
        assert row["skipped"] is None and row["epochs"] == 2
        for fmt in ("float", "int8"):
            assert len(row[fmt]["accuracy"]) == 1 and 0.0 <= row[fmt]["accuracy_mean"] <= 1.0
            assert row[fmt]["accuracy_worst"] <= row[fmt]["accuracy_mean"]
        assert row["diff"] == [row["int8"]["accuracy"][0] - row["float"]["accuracy"][0]]
        assert math.isclose(row["diff_mean"], row["diff"][0]) and row["diff_worst"] == row["diff"][0]
        assert row["target_holds"] == (row["diff_mean"] * 100 >= -0.5)
        # The transfer's own measurement: int8 frozen weights take well under a third of float's.
        assert 0 < row["int8"]["frozen_bytes"] < 0.3 * row["float"]["frozen_bytes"]
        assert row["int8"]["activation_bytes"] == row["float"]["activation_bytes"]

    models = {r["model"]: r for r in result["bytes"]}
    assert {"mobilenetv2", "vit"} <= set(models)
    for name, row in models.items():
        assert row["int8_layers"] > 0, name
        assert set(row["float"]) == set(row["int8"]) == BYTE_KEYS
        f, q = row["float"], row["int8"]
        assert 0 < q["frozen_param_bytes"] < 0.3 * f["frozen_param_bytes"], name
        assert q["quantised_layer_weight_bytes"] <= 0.27 * f["quantised_layer_weight_bytes"], name
        assert q["param_bytes"] < f["param_bytes"], name
        assert math.isclose(row["frozen_ratio"], q["frozen_param_bytes"] / f["frozen_param_bytes"])
        assert math.isclose(row["peak_x_lower"], f["peak_bytes"] / q["peak_bytes"])
    mobilenet = models["mobilenetv2"]
    assert mobilenet["int8"]["peak_bytes"] < mobilenet["float"]["peak_bytes"]
    # Convolutions save the int8 weight for backward, not a float copy: the same saved bytes as float.
    assert mobilenet["int8"]["activation_bytes"] == mobilenet["float"]["activation_bytes"]

    timing = result["time"]
    assert timing["reps"] == 2 and timing["time_ratio"] > 0 and timing["wall_ratio"] > 0
    assert all(timing[fmt]["step_cpu_ms"] > 0 for fmt in ("float", "int8"))
    assert set(result["targets_hold"]) == {
        "accuracy",
        "weight_bytes",
        "quantised_layer_bytes",
        "peak",
        "step_time",
    }
    assert all(isinstance(v, bool) for v in result["targets_hold"].values())
