"""The digits transfer task: pretrained on 0-4, adapted to 5-9 (issue 2's accuracy claim)."""

from __future__ import annotations

import math
import statistics

import pytest

from memory.transfer import run_transfer

SEEDS = (0, 1, 2)


@pytest.mark.slow
def test_lite_residual_plus_bias_is_close_to_full_fine_tuning_and_beats_last_layer() -> None:
    """The claim over seeds 0-2 (split, pretraining and training re-drawn), mean and worst.

    Measured gaps to full fine-tuning (points, seeds 0 / 1 / 2 / 3 / 4; 2026-12-06, re-measured after
    issues 14-19): AVX-512 1.8 / 1.3 / -0.4 / 4.9 / 3.6 with 1 thread and 3.1 / 1.8 / 1.3 / 2.2 / 3.1
    with 2; oneDNN and ATen capped to AVX2 2.7 / 0.9 / 4.0 / 3.1 / 3.6, to generic kernels 2.2 / 0.0 /
    2.2 / 2.2 / 1.8; another AVX-512 machine 4.0 / -0.4 / 2.2 / 5.3 / 0.9 (issue 12). Mean over seeds 0-2
    at most 2.5, worst 4.9; lite residual led last layer by 5.3 points or more on every path.
    Bounds: a mean gap of 3 points and a worst of 6, a lead over last layer of 3 points on every seed.
    """
    gaps, leads = [], []
    for seed in SEEDS:
        result = run_transfer("cnn", schemes=("full", "last_layer", "lite_residual"), epochs=10, seed=seed)
        full = result.outcome("full").accuracy
        last = result.outcome("last_layer").accuracy
        lite = result.outcome("lite_residual").accuracy
        assert result.source_accuracy >= 0.95, f"seed {seed}"  # a genuinely pretrained backbone
        assert result.outcome("lite_residual").trainable_params < result.outcome("full").trainable_params
        assert "| lite_residual |" in result.to_markdown()
        gaps.append(full - lite)
        leads.append(lite - last)
    table = f"gaps to full {gaps}, leads over last layer {leads} (seeds {SEEDS})"
    assert statistics.fmean(gaps) <= 0.03 and max(gaps) <= 0.06, table
    assert min(leads) >= 0.03, table


def test_inapplicable_schemes_are_reported_not_crashed() -> None:
    result = run_transfer("cnn", schemes=("lora", "last_layer"), epochs=1, seed=0)
    lora = result.outcome("lora")
    assert lora.skipped and "no linear layer" in lora.skipped and math.isnan(lora.accuracy)
    assert 0.0 < result.outcome("last_layer").accuracy <= 1.0
    assert result.to_dict()["outcomes"][0]["scheme"] == "lora"


def test_int8_compression_shrinks_what_a_transformer_keeps_and_its_cost_is_measured() -> None:
    """GELU inputs kept in 8 bits: fewer bytes for backward, accuracy close to the uncompressed run.

    Over seeds 0-2, paired per seed. Measured over seeds 0-4 on the default, AVX2 and AVX-512 kernel
    paths: the compressed run's accuracy equals the plain run's on every seed (0.72-0.84); re-measured
    2026-12-06 with memory-sharing LayerNorms and float16 attention under compress, AVX-512 with 1 and 2
    threads too: still equal on every seed and path.
    """
    small = {"image_size": 8, "patch_size": 4, "dim": 16, "depth": 1, "heads": 2}
    gaps = []
    for seed in (0, 1, 2):
        plain = run_transfer("vit", schemes=("full",), epochs=2, seed=seed, **small)
        packed = run_transfer("vit", schemes=("full",), epochs=2, seed=seed, compress="int8", **small)
        assert plain.compress is None and packed.compress == "int8"
        kept, kept_int8 = plain.outcome("full").activation_bytes, packed.outcome("full").activation_bytes
        assert kept is not None and kept_int8 is not None and 0 < kept_int8 < kept
        gaps.append(abs(packed.outcome("full").accuracy - plain.outcome("full").accuracy))
    assert sum(gaps) / 3 <= 0.05 and max(gaps) <= 0.1, gaps
