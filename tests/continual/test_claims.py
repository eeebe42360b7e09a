"""Issue 18's figures over seeds, in the settings of ``bench/continual.py`` (its table has seeds 0-4).

From scratch (``class-incremental``, 8 px, ``cnn`` under ``full``, Adam lr 1e-3, batches of 10, 4 steps
per batch, replay batches of 32, 200 samples), replay's default recipe on seeds 0 / 1 / 2: ACC 0.965 /
0.971 / 0.962 (AVX-512). Pretrained on digits 0-3 with the stream 4-9 (``class-incremental-novel``, 16 px,
``last_layer``, Adam lr 0.1): raw replay 0.847 / 0.870 / 0.829, 8-bit latent replay 0.859 / 0.863 /
0.844 at 138 instead of 1,026 bytes per sample. Bounds leave a few points below the measured mean and
worst for other CPU kernel paths.
"""

from __future__ import annotations

import statistics

import pytest
import torch

import ondevice
from ondevice.continual import LearnerConfig, create_learner, load_scenario, run_scenario
from ondevice.continual.scenarios import ContinualResult

SEEDS = (0, 1, 2)
PRETRAINED_LR = 0.1
# Replay's default recipe from scratch: mean 0.966, worst 0.962 on seeds 0-2; the bounds leave 2.5 points
# below the mean and 4 below the worst.
MEAN_BOUND, WORST_BOUND = 0.94, 0.92
# Raw replay on the pretrained backbone: mean 0.849 on seeds 0-2; 7 points of margin (it is lr-sensitive).
RAW_MEAN_BOUND = 0.78


def _run(seed: int, strategy: str, *, pretrained: bool, **options: object) -> ContinualResult:
    name, size = ("class-incremental-novel", 16) if pretrained else ("class-incremental", 8)
    scenario = load_scenario(name, seed=seed, image_size=size)
    if pretrained:
        model = scenario.backbone(epochs=20, seed=seed)
    else:
        torch.manual_seed(seed)
        model = ondevice.create_model("cnn", num_classes=2)
    torch.manual_seed(seed)
    learner = create_learner(
        ondevice.prepare(model, "last_layer" if pretrained else "full"),
        strategy,
        optimizer="adam",
        lr=PRETRAINED_LR if pretrained else 1e-3,
        config=LearnerConfig(replay_steps=4, replay_batch_size=32, seed=seed),
        seed=seed,
        **options,  # type: ignore[arg-type]
    )
    return run_scenario(learner, scenario, batch_size=10, seed=seed)


@pytest.mark.slow
def test_replay_from_scratch_meets_the_issue_figures() -> None:
    runs = [_run(seed, "replay", pretrained=False, buffer_size=200) for seed in SEEDS]
    accs = [r.metrics.acc for r in runs]
    assert statistics.fmean(accs) >= MEAN_BOUND and min(accs) >= WORST_BOUND, f"ACC {accs} (seeds {SEEDS})"
    naive = _run(SEEDS[0], "naive", pretrained=False)
    assert naive.metrics.acc < 0.3 and naive.metrics.avg_forgetting > 0.8  # catastrophic without memory


@pytest.mark.slow
def test_8bit_latent_replay_matches_raw_replay_in_a_seventh_of_the_bytes() -> None:
    raw = [_run(seed, "replay", pretrained=True, buffer_size=200) for seed in SEEDS]
    latent = [_run(seed, "latent-replay", pretrained=True, buffer_size=200, bits=8) for seed in SEEDS]
    raw_acc, latent_acc = [r.metrics.acc for r in raw], [r.metrics.acc for r in latent]
    figures = f"raw {raw_acc}, latent 8-bit {latent_acc} (seeds {SEEDS})"
    assert statistics.fmean(latent_acc) >= statistics.fmean(raw_acc) - 0.02, figures
    assert statistics.fmean(raw_acc) >= RAW_MEAN_BOUND, figures
    for r, lt in zip(raw, latent, strict=True):
        assert r.bytes_per_sample >= 4 * lt.bytes_per_sample
