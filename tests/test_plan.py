"""memory.plan: scheme search under a budget, contribution analysis, infeasible budgets, the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import memory
import ondevice
from memory import Budget
from memory.plan import _CostTable, _Sparse, _to_scheme
from ondevice.errors import BudgetExceededError
from ondevice.models import create_model


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 12, 1), nn.BatchNorm2d(12),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    )  # fmt: skip


@pytest.mark.slow
def test_cost_table_matches_estimate_on_random_sparse_schemes() -> None:
    model = _net()
    budget = Budget(10**7)
    table = _CostTable(model, "13", (4, 3, 16, 16), budget, optimizer=None, loss_fn=None)
    rng = random.Random(0)
    for _ in range(8):
        weights = {}
        for i in rng.sample(range(4), rng.randint(0, 3)):
            weights[i] = 1.0 if i == 2 else rng.choice((0.25, 0.5, 1.0))
        cand = _Sparse(rng.randint(0, 4), tuple(sorted(weights.items())))
        prepared = ondevice.prepare(model, _to_scheme(cand))
        report = memory.estimate(prepared.model, (4, 3, 16, 16))
        assert table.needed(cand) == memory.budget_bytes_needed(report, budget), cand


def test_plan_picks_the_best_scheme_that_fits_and_serialises() -> None:
    model = _net()
    roomy = memory.plan(model, "64MB", (3, 16, 16), batch_size=2)
    # Everything fits: full fine-tuning's gain (1 in the prior's units), at the fewest bytes that reach it.
    assert roomy.score == pytest.approx(1.0)
    assert roomy.needed_bytes <= min(c.needed_bytes for c in roomy.considered if c.scheme["name"] == "full")
    bias = memory.estimate(ondevice.prepare(model, "bias"), (3, 16, 16), batch_size=2)
    tight_bytes = memory.budget_bytes_needed(bias, Budget(1)) - 1  # bias no longer fits
    tight = memory.plan(model, tight_bytes, (3, 16, 16), batch_size=2)
    assert tight.needed_bytes <= tight_bytes
    assert tight.needed_bytes == memory.budget_bytes_needed(tight.report, tight.budget)
    assert tight.scheme.name in ("sparse", "last_layer")
    assert all(c.score <= tight.score for c in tight.considered if c.fits)
    assert json.loads(json.dumps(tight.to_dict()))["needed_bytes"] == tight.needed_bytes
    assert "| candidate | needed | fits | gain | how |" in tight.to_markdown()


def test_infeasible_budget_names_the_smallest_achievable_figure() -> None:
    model = _net()
    smallest = memory.estimate(ondevice.prepare(model, "last_layer"), (3, 16, 16), batch_size=2)
    floor = memory.budget_bytes_needed(smallest, Budget(1))
    with pytest.raises(BudgetExceededError, match=f"smallest achievable is {floor} bytes") as info:
        memory.plan(model, floor - 1, (3, 16, 16), batch_size=2)
    assert info.value.smallest_bytes == floor and info.value.budget_bytes == floor - 1
    assert memory.plan(model, floor, (3, 16, 16), batch_size=2).needed_bytes == floor


def _blind_first_layer_task() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The label lives in input feature 0, which the pretrained first layer ignores (zero column).

    Only training the first layer's weights can recover it; the prior prefers later layers.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].weight[:, 0] = 0.0
    x = torch.randn(256, 24)
    y = (x[:, 0] > 0).long()
    return model, (x, y)


def test_measured_contributions_beat_the_prior() -> None:
    model, data = _blind_first_layer_task()
    shape = (24,)
    costs = {}
    for layers in ((0,), (1,), (0, 1)):
        scheme = ondevice.schemes.Sparse(bias_last_k=0, weight_layers=layers)
        report = memory.estimate(ondevice.prepare(model, scheme), shape, batch_size=16)
        costs[layers] = memory.budget_bytes_needed(report, Budget(1))
    budget = max(costs[(0,)], costs[(1,)])
    assert costs[(0, 1)] > budget  # one weight layer fits, not two
    kwargs = {"batch_size": 16, "candidates": ["last_layer"], "ratios": (1.0,)}
    prior = memory.plan(model, budget, shape, **kwargs)
    assert prior.score_source == "prior" and prior.scheme.weight_layers == (1,)
    measured = memory.plan(model, budget, shape, data, steps=60, lr=0.1, **kwargs)
    assert measured.score_source == "measured"
    assert measured.scheme.weight_layers == (0,)
    assert measured.score > 0.2  # accuracy points gained over training the head alone


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv2", "mcunet"])
def test_tiny_training_256kb_plans(name: str) -> None:
    model = create_model(name, width_mult=0.35, resolution=128, num_classes=10)
    budget = Budget.parse("256KB", frozen_param_bits=8)
    chosen = memory.plan(model, budget, batch_size=1)
    assert chosen.scheme.name == "sparse" and chosen.report.source == "estimated"
    assert chosen.needed_bytes <= 256 * 1024
    assert chosen.report.frozen_param_bits == 8
    # tiny-training's finding: a sparse update beats updating the last layer alone
    named = {c.scheme["name"]: c for c in chosen.considered if c.scheme["name"] != "sparse"}
    assert chosen.score > named["last_layer"].score


@pytest.mark.slow
def test_cli_plan_scheme_and_budget() -> None:
    from ondevice.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["plan", "--model", "cnn", "--scheme", "bias", "--batch-size", "4", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["report"]["source"] == "estimated" and payload["report"]["activation_bytes"] > 0
    result = runner.invoke(app, ["plan", "--model", "cnn", "--budget", "1KB", "--int8-frozen", "--json"])
    assert result.exit_code == 2 and "smallest achievable" in result.output
    result = runner.invoke(app, ["plan", "--model", "cnn", "--budget", "2MB", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["plan"]["needed_bytes"] <= 2 * 1024**2
    result = runner.invoke(app, ["plan", "--model", "cnn"])
    assert result.exit_code == 2 and "exactly one of" in result.output
