"""Smoke test of bench/memory.py: it runs, its JSON has the documented shape, ondevice saves no more."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

VARIANT_KEYS = {
    "saved_bytes",
    "peak_bytes",
    "rss_import_bytes",
    "rss_peak_bytes",
    "rss_added_bytes",
    "rss_first_step_added_bytes",
    "rss_current_added_bytes",
    "rss_code_bytes",
    "rss_step_cpu_ms",
    "rss_over_tensor_peak",
    "step_wall_ms",
    "step_cpu_ms",
    "time_ratio",
    "wall_ratio",
}


@pytest.mark.slow
@pytest.mark.integration
def test_quick_bench_reports_every_case_and_ondevice_saves_no_more_than_stock(
    run_bench: Callable[..., dict[str, Any]],
) -> None:
    result = run_bench("memory.py", "--quick", "--schemes", "last_layer,bias,lora", timeout=900)
    assert result["config"]["threads"] == 1 and result["config"]["quick"] is True
    assert result["config"]["rss_steps"] == 10
    assert "native conv" in result["config"]["rss_settings"]["ondevice"]
    assert set(result["config"]["models"]) == {"mobilenetv2", "vit"}
    seen = {(case["model"], case["scheme"]) for case in result["cases"]}
    # Three schemes keep the smoke test short; LoRA applies to the transformer only.
    assert seen == {
        ("mobilenetv2", "last_layer"),
        ("mobilenetv2", "bias"),
        ("vit", "last_layer"),
        ("vit", "bias"),
        ("vit", "lora"),
    }
    for case in result["cases"]:
        variants = case["variants"]
        assert set(variants) == {"stock", "bit", "byte"}
        for figures in variants.values():
            assert set(figures) == VARIANT_KEYS
            assert all(figures[k] >= 0 for k in VARIANT_KEYS)
        assert set(case["ratios"]) == {"bit", "byte"}
        for name in ("bit", "byte"):
            where = f"{case['model']}/{case['scheme']}/{name}"
            assert variants[name]["saved_bytes"] <= variants["stock"]["saved_bytes"], where
            assert set(case["ratios"][name]) == {"saved", "peak", "rss_added", "time", "wall"}
            assert variants[name]["rss_peak_bytes"] > variants[name]["rss_import_bytes"] > 0
        assert variants["bit"]["saved_bytes"] <= variants["byte"]["saved_bytes"]


@pytest.mark.slow
@pytest.mark.integration
def test_ablation_reports_every_setting(run_bench: Callable[..., dict[str, Any]]) -> None:
    result = run_bench("memory.py", "--ablation", "--quick", "--rss-steps", "2", timeout=900)
    rows = result["rows"]
    assert {"torch defaults", "SDK policy", "stock, torch defaults"} <= set(rows)
    for row in rows.values():
        assert row["rss_added_bytes"] >= row["rss_first_step_added_bytes"] >= 0
        assert row["rss_peak_bytes"] > row["rss_import_bytes"]
    assert result["config"]["tensor_peak_bytes"]["bit"] < result["config"]["tensor_peak_bytes"]["stock"]
