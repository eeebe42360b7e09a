"""Issue 4's figures over seeds, with the benchmark's setting (bench/continual.py at 16 px).

A seed re-draws the pool/stream/test split, the pretraining, the learner and the stream's order. Replay's
ACC measured here (``python bench/continual.py --seeds 3``), seeds 0 / 1 / 2: 0.866 / 0.871 / 0.815 on
AVX-512 (mean 0.851), forgetting 0.072 / 0.075 / 0.069; 0.866 / 0.869 / 0.819 with oneDNN and ATen capped
to AVX2, 0.862 / 0.864 / 0.824 capped to generic kernels; seed 2 gave 0.822 on another machine (issue 12).
Bounds with about 5 points of margin: ACC mean >= 0.80 and worst >= 0.76, forgetting mean <= 0.12 and
worst <= 0.20 (seed 4, not tested, reaches 0.13).
"""

from __future__ import annotations

import statistics

import pytest
import torch

import ondevice
from ondevice.continual import LearnerConfig, create_learner, load_scenario, run_scenario
from ondevice.continual.scenarios import ContinualResult

SEEDS = (0, 1, 2)


def _run_seed(seed: int) -> dict[str, ContinualResult]:
    scenario = load_scenario("class-incremental", seed=seed, image_size=16)
    backbone = scenario.backbone(epochs=20, seed=seed)
    outcomes = {}
    for label, strategy, options in [
        ("naive", "naive", {}),
        ("replay", "replay", {"buffer_size": 200}),
        ("latent8", "latent-replay", {"buffer_size": 200, "bits": 8}),
    ]:
        torch.manual_seed(seed)
        learner = create_learner(
            ondevice.prepare(backbone, "last_layer"),
            strategy,
            optimizer="adam",
            lr=0.01,
            config=LearnerConfig(replay_steps=4, replay_batch_size=32, seed=seed),
            seed=seed,
            **options,
        )
        outcomes[label] = run_scenario(learner, scenario, batch_size=10, seed=seed)
    return outcomes


@pytest.mark.slow
def test_replay_meets_the_issue_figures_and_8bit_latents_match_it_in_a_seventh_of_the_bytes() -> None:
    runs = [_run_seed(seed) for seed in SEEDS]
    accs = [r["replay"].metrics.acc for r in runs]
    forgetting = [r["replay"].metrics.avg_forgetting for r in runs]
    figures = f"replay ACC {accs}, forgetting {forgetting} (seeds {SEEDS})"
    assert statistics.fmean(accs) >= 0.80 and min(accs) >= 0.76, figures
    assert statistics.fmean(forgetting) <= 0.12 and max(forgetting) <= 0.20, figures
    for seed, run in zip(SEEDS, runs, strict=True):
        naive, replay, latent = (run[k] for k in ("naive", "replay", "latent8"))
        # catastrophic forgetting without memory, on every seed
        assert naive.metrics.avg_forgetting > 0.8 and naive.metrics.acc < 0.3, f"seed {seed}"
        assert latent.metrics.acc >= replay.metrics.acc - 0.02, f"seed {seed}"
        assert replay.buffer_bytes >= 4 * latent.buffer_bytes  # both hold 200 samples
