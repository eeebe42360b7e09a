"""Issue 4's figures, reproduced with the benchmark's setting (bench/continual.py at 16 px)."""

from __future__ import annotations

import pytest
import torch

import ondevice
from ondevice.continual import LearnerConfig, create_learner, load_scenario, run_scenario


@pytest.mark.slow
def test_replay_meets_the_issue_figures_and_8bit_latents_match_it_in_a_seventh_of_the_bytes() -> None:
    scenario = load_scenario("class-incremental", seed=0, image_size=16)
    backbone = scenario.backbone(epochs=20, seed=0)
    outcomes = {}
    for label, strategy, options in [
        ("naive", "naive", {}),
        ("replay", "replay", {"buffer_size": 200}),
        ("latent8", "latent-replay", {"buffer_size": 200, "bits": 8}),
    ]:
        torch.manual_seed(0)
        learner = create_learner(
            ondevice.prepare(backbone, "last_layer"),
            strategy,
            optimizer="adam",
            lr=0.01,
            config=LearnerConfig(replay_steps=4, replay_batch_size=32, seed=0),
            seed=0,
            **options,
        )
        outcomes[label] = run_scenario(learner, scenario, batch_size=10, seed=0)
    naive, replay, latent = (outcomes[k] for k in ("naive", "replay", "latent8"))
    assert replay.metrics.acc >= 0.85 and replay.metrics.avg_forgetting <= 0.10
    assert naive.metrics.avg_forgetting > 0.8 and naive.metrics.acc < 0.3  # catastrophic forgetting
    assert latent.metrics.acc >= replay.metrics.acc - 0.02
    assert replay.buffer_bytes >= 4 * latent.buffer_bytes  # both hold 200 samples
