"""Scenarios: honest splits, the experiment loop, file data and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ondevice
from ondevice.cli import app
from ondevice.continual import create_learner, load_scenario, run_scenario
from ondevice.continual.scenarios import _three_way
from ondevice.data import load_digits, load_table
from ondevice.errors import ConfigError, UnknownNameError
from ondevice.pretrain import pretrain_backbone

runner = CliRunner()


def test_pool_stream_and_test_are_disjoint_and_cover_the_data() -> None:
    y = load_digits().y
    pool, stream, test = _three_way(y, seed=0)
    sets = [set(t.tolist()) for t in (pool, stream, test)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert len(sets[0] | sets[1] | sets[2]) == len(y)


def test_class_incremental_scenario_shape() -> None:
    scenario = load_scenario("class-incremental")
    assert [e.classes for e in scenario.experiences] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert scenario.pretrain_classes == (0, 1, 2, 3, 4)
    for exp in scenario.experiences:
        assert exp.train.classes == exp.classes == exp.test.classes
    # No stream or test sample is in the pretraining pool (compared by content).
    pool = {tuple(r) for r in scenario.pretrain_data.x.flatten(1).tolist()}
    seen = {
        tuple(r) for e in scenario.experiences for d in (e.train, e.test) for r in d.x.flatten(1).tolist()
    }
    assert len(pool & seen) <= 5  # the digits hold a few exact duplicate images


@pytest.mark.parametrize("name", ["domain-incremental", "sensor"])
def test_domain_scenarios(name: str) -> None:
    scenario = load_scenario(name)
    assert len(scenario.experiences) == 4 and scenario.initial_classes == 10
    shape = (1, 64) if name == "sensor" else (1, 8, 8)
    assert scenario.experiences[0].train.shape == shape
    assert not torch.equal(scenario.experiences[1].test.x, scenario.experiences[0].test.x)
    with pytest.raises(UnknownNameError, match="scenario"):
        load_scenario("task-incremental")


@pytest.mark.slow
def test_replay_beats_naive_on_class_incremental_digits(tmp_path: Path) -> None:
    """Over seeds 0-2 (scenario split, pretraining and stream order re-drawn), mean and worst.

    Measured over seeds 0-4 on the default, AVX2 and AVX-512 kernel paths (AVX-512 with 1 and 2 threads;
    re-measured 2026-12-06, identical on all four): naive forgetting 0.83-0.94 (mean of 0-2: 0.87), latent
    replay's lead in ACC 0.37-0.52 points; the bounds keep a margin to both.
    """
    forgetting, leads = [], []
    for seed in (0, 1, 2):
        scenario = load_scenario("class-incremental", seed=seed)
        backbone = pretrain_backbone("cnn", scenario.pretrain_data, epochs=3, cache_dir=tmp_path,
                                     channels=(16, 32, 64), seed=seed)  # fmt: skip
        backbone.replace_head(2)
        results = {}
        for strategy in ("naive", "latent-replay"):
            learner = create_learner(
                ondevice.prepare(backbone, "last_layer"), strategy, optimizer="adam", lr=0.01
            )
            results[strategy] = run_scenario(learner, scenario.experiences, batch_size=10, seed=seed)
        naive, replay = results["naive"].metrics, results["latent-replay"].metrics
        forgetting.append(naive.avg_forgetting)
        leads.append(replay.acc - naive.acc)
        assert replay.avg_forgetting < naive.avg_forgetting, f"seed {seed}"
        assert results["latent-replay"].buffer_bytes == 200 * (64 + 8 + 2)
    table = f"naive forgetting {forgetting}, replay's lead in ACC {leads} (seeds 0-2)"
    assert sum(forgetting) / 3 > 0.8 and min(forgetting) > 0.75, table  # catastrophic forgetting
    assert sum(leads) / 3 > 0.3 and min(leads) > 0.25, table
    data = load_scenario("class-incremental").pretrain_data
    # The cache serves the second call.
    again = pretrain_backbone("cnn", data, epochs=3, cache_dir=tmp_path, channels=(16, 32, 64))
    assert torch.equal(
        again.features[0].conv.weight,
        pretrain_backbone("cnn", data, epochs=3, cache_dir=tmp_path, channels=(16, 32, 64))
        .features[0]
        .conv.weight,
    )


def _write_csv(path: Path, n: int = 60) -> None:
    digits = load_digits(layout="sequence")
    table = np.concatenate([digits.x[:n, 0].numpy(), digits.y[:n, None].numpy() % 3], axis=1)
    header = ",".join([f"f{i}" for i in range(64)] + ["label"])
    np.savetxt(path, table, delimiter=",", header=header, comments="")


def test_load_table_csv_and_npy(tmp_path: Path) -> None:
    csv = tmp_path / "data.csv"
    _write_csv(csv)
    data = load_table(csv)
    assert data.shape == (1, 64) and len(data) == 60 and data.classes == (0, 1, 2)
    npy = tmp_path / "data.npy"
    np.save(npy, np.concatenate([data.x[:, 0].numpy(), data.y[:, None].numpy()], axis=1))
    assert torch.equal(load_table(npy, input_shape=(1, 8, 8)).x, data.x.reshape(-1, 1, 8, 8))
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,0.5\n3,4,1\n")
    with pytest.raises(ConfigError, match="integer labels"):
        load_table(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_table(tmp_path / "missing.csv")


def test_cli_train_on_a_csv_file(tmp_path: Path) -> None:
    csv = tmp_path / "data.csv"
    _write_csv(csv)
    state = tmp_path / "state.safetensors"
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(csv),
            "--strategy",
            "replay",
            "--buffer",
            "20",
            "--drift",
            "adwin",
            "--checkpoint",
            str(state),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["samples"] == 60 and payload["classes"] == 3 and payload["buffer_bytes"] == 20 * 258
    assert state.exists()


def test_cli_rejects_bad_input_without_a_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2 and "exactly one" in result.output
    csv = tmp_path / "data.csv"
    _write_csv(csv)
    result = runner.invoke(app, ["train", "--data", str(csv), "--strategy", "gdumb"])
    assert result.exit_code == 2 and "unknown strategy 'gdumb'" in result.output
    assert "Traceback" not in result.output
    help_text = runner.invoke(app, ["train", "--help"]).output
    assert "LAST column" in help_text
