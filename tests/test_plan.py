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
from memory import Budget, format_bytes
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
    assert "| candidate | needed | fits | gain | compute | how |" in tight.to_markdown()


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
    # tiny-training's setting: 256 KB of SRAM for training, int8 frozen weights kept in flash
    budget = Budget.parse("256KB", count_frozen_params=False, frozen_param_bits=8)
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


# -- issue 12: an honest planner ---------------------------------------------------------------------


def _frozen_numel(prepared: ondevice.PreparedModel) -> int:
    return sum(p.numel() for p in prepared.model.parameters() if not p.requires_grad)


def test_fewer_frozen_bits_count_frozen_weights_unless_kept_out_explicitly() -> None:
    model = _net()
    prepared = ondevice.prepare(model, "bias")
    report = memory.estimate(prepared, (3, 16, 16), batch_size=2, frozen_param_bits=8)
    floats = memory.estimate(prepared, (3, 16, 16), batch_size=2)
    base = report.activation_bytes + report.training_state_bytes
    assert base == floats.activation_bytes + floats.training_state_bytes
    # At 8 bits: the frozen parameters as the int8-held model holds them (int8 weights, float32 scales
    # and norms), which is what measure reports of that model.
    held = ondevice.prepare(model, "bias", frozen_weights="int8")
    held_bytes = sum(p.numel() * p.element_size() for p in held.model.parameters() if not p.requires_grad)
    assert report.frozen_param_bytes == held_bytes < _frozen_numel(prepared) * 2
    int8 = Budget(10**7, frozen_param_bits=8)
    assert int8.count_frozen_params is True and Budget(10**7).count_frozen_params is False
    assert memory.budget_bytes_needed(report, int8) == base + held_bytes
    assert memory.budget_bytes_needed(floats, Budget(10**7, frozen_param_bits=16)) == (
        base + 2 * _frozen_numel(prepared)
    )
    # An explicit False keeps them out of the budget (an MCU stores them in flash), at 8 bits.
    flash = Budget(10**7, count_frozen_params=False, frozen_param_bits=8)
    assert memory.budget_bytes_needed(report, flash) == base
    # The planner's figure follows: 8-bit frozen weights are part of what it compares with the budget.
    chosen = memory.plan(model, int8, (3, 16, 16), batch_size=2, search_sparse=False, candidates=("bias",))
    assert chosen.needed_bytes == base + held_bytes
    assert "frozen parameters at 8 bit" in chosen.to_dict()["requirement"]["terms"]


def test_a_plan_that_trains_every_layer_is_called_full() -> None:
    model = _net()
    chosen = memory.plan(model, "64MB", (3, 16, 16), batch_size=2)
    assert chosen.scheme.name == "full" and chosen.score == pytest.approx(1.0)
    every = [
        c
        for c in chosen.considered
        if c.scheme["name"] == "sparse"
        and len(c.scheme["weight_layers"]) == 4
        and all(r >= 1.0 for r in c.scheme["channel_ratios"] or [1.0] * 4)
    ]
    assert not every, "a sparse candidate trains every layer's weights at full width while full fits"
    # When full itself does not fit, the search may still use every layer at a reduced width.
    full = next(c for c in chosen.considered if c.scheme["name"] == "full")
    tight = memory.plan(model, full.needed_bytes - 1, (3, 16, 16), batch_size=2)
    assert tight.scheme.name != "full" and tight.needed_bytes < full.needed_bytes


def test_budget_from_a_profile_knows_the_device_and_flags_what_it_cannot_hold() -> None:
    from devices import get_profile
    from memory.report import device_limits, stored_weight_bytes

    mcu = get_profile("stm32f746").to_budget()
    assert mcu.flash_bytes == 1024**2 and mcu.memory_bytes == 320 * 1024
    assert not mcu.count_frozen_params and mcu.frozen_param_bits == 8
    model = _net()
    report = memory.estimate(ondevice.prepare(model, "bias"), (3, 16, 16), batch_size=2)
    stored = stored_weight_bytes(report, mcu)
    roomy = Budget(10**6, name="board", frozen_param_bits=8, count_frozen_params=False,
                   memory_bytes=report.peak_bytes, flash_bytes=stored)  # fmt: skip
    assert device_limits(report, roomy) == []
    small = Budget(10**6, name="board", frozen_param_bits=8, count_frozen_params=False,
                   memory_bytes=report.peak_bytes - 1, flash_bytes=stored - 1)  # fmt: skip
    flash, peak = device_limits(report, small)
    assert "flash of board" in flash and "eager peak" in peak and "memory of board" in peak


def test_plan_markdown_says_which_figure_is_the_requirement() -> None:
    model = _net()
    report = memory.estimate(ondevice.prepare(model, "bias"), (3, 16, 16), batch_size=2)
    budget = Budget(memory.budget_bytes_needed(report, Budget(1)) * 2, name="board",
                    memory_bytes=report.peak_bytes - 1)  # fmt: skip
    chosen = memory.plan(model, budget, (3, 16, 16), batch_size=2)
    text = chosen.to_markdown()
    needed = format_bytes(chosen.needed_bytes)
    assert f"Requirement (compared with the budget): {needed} of {format_bytes(budget.total_bytes)}" in text
    assert f"Not the requirement: the peak of {format_bytes(chosen.report.peak_bytes)}" in text
    assert "Exceeds the device" in text and "eager peak" in text
    payload = chosen.to_dict()
    assert sum(payload["requirement"]["terms"].values()) == chosen.needed_bytes
    assert payload["exceeds_device"] and payload["requirement"]["compared_with"] == "budget.total_bytes"


def test_cli_int8_frozen_counts_frozen_weights_and_device_plans_say_what_is_compared() -> None:
    from ondevice.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["plan", "--model", "cnn", "--budget", "2MB", "--int8-frozen", "--json"])
    assert result.exit_code == 0, result.output
    chosen = json.loads(result.stdout)["plan"]
    assert chosen["budget"]["count_frozen_params"] and chosen["budget"]["frozen_param_bits"] == 8
    assert "frozen parameters at 8 bit" in chosen["requirement"]["terms"]
    assert sum(chosen["requirement"]["terms"].values()) == chosen["needed_bytes"]
    result = runner.invoke(
        app, ["plan", "--model", "cnn", "--budget", "2MB", "--int8-frozen", "--no-count-frozen"]
    )
    assert result.exit_code == 2 and "--int8-frozen" in result.output and "--no-count-frozen" in result.output

    args = ["plan", "--device", "stm32f746", "--model", "mobilenetv2", "--width-mult", "0.35",
            "--resolution", "32"]  # fmt: skip
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    chosen = json.loads(result.stdout)["plan"]
    # The device's convention: int8 frozen weights in flash, checked against it; SRAM holds the rest.
    assert not chosen["budget"]["count_frozen_params"] and chosen["budget"]["frozen_param_bits"] == 8
    assert chosen["budget"]["flash_bytes"] == 1024**2
    assert any("eager peak" in line for line in chosen["exceeds_device"])
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Requirement (compared with the budget)" in text and "Not the requirement: the peak" in text
    assert "Exceeds the device" in text and "kept in flash" in text


def test_cli_plan_prints_markup_like_device_names_as_text() -> None:
    from ondevice.cli import app

    result = CliRunner().invoke(app, ["plan", "--device", "[/bold]"])
    assert result.exit_code == 2, result.output
    assert "[/bold]" in result.output and "--device" in result.output


@pytest.mark.slow
def test_cli_plan_budgets_the_process_for_linux_boards_and_process_rss() -> None:
    from ondevice.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["plan", "--model", "cnn", "--budget", "80MiB", "--process-rss", "--json"])
    assert result.exit_code == 0, result.output
    planned = json.loads(result.stdout)["plan"]
    assert planned["requirement"]["counts_process"] is True
    assert planned["budget"]["process_overhead_bytes"] > 0
    overhead = planned["budget"]["process_overhead_bytes"]
    assert planned["needed_bytes"] >= overhead + planned["report"]["peak_bytes"]
    result = runner.invoke(app, ["plan", "--model", "cnn", "--device", "rpi-4b-2gb"])
    assert result.exit_code == 0, result.output
    assert "peak RSS" in result.output
    result = runner.invoke(app, ["plan", "--model", "cnn", "--scheme", "bias", "--process-rss"])
    assert result.exit_code == 2 and "--process-rss applies to --budget" in result.output
    result = runner.invoke(app, ["plan", "--model", "cnn", "--budget", "64MiB", "--process-rss"])
    assert result.exit_code == 2 and "smallest achievable" in result.output


# -- issue 17: plans that need frozen weights held in int8 -----------------------------------------------


def test_a_plan_that_fits_only_in_int8_says_so_and_is_the_int8_models_step() -> None:
    model = _net()
    int8 = Budget(3000, count_frozen_params=True, frozen_param_bits=8)
    chosen = memory.plan(model, int8, (3, 16, 16), batch_size=2, search_sparse=False)
    assert chosen.scheme.name == "last_layer" and chosen.frozen_weights == "int8"
    # What it costs with float32 frozen weights, and that this exceeds the budget.
    floats = memory.estimate(ondevice.prepare(model, "last_layer"), (3, 16, 16), batch_size=2)
    float32 = Budget(3000, count_frozen_params=True)
    assert chosen.float_needed_bytes == memory.budget_bytes_needed(floats, float32) > 3000
    assert chosen.needs_int8 and chosen.to_dict()["needs_int8"] is True
    assert "Needs frozen weights held in int8" in chosen.to_markdown()
    assert 'frozen_weights="int8"' in chosen.prepare_call()
    # The plan's report is the measured step of the model prepared as the plan says.
    held = ondevice.prepare(model, chosen.scheme, frozen_weights="int8")
    measured = memory.measure(held, torch.randn(2, 3, 16, 16))
    assert memory.budget_bytes_needed(measured, int8) == chosen.needed_bytes
    # With float32 frozen weights nothing fits, and the refusal names the int8 plan that does.
    with pytest.raises(BudgetExceededError, match=r"hold frozen weights in int8: then last_layer fits"):
        memory.plan(model, float32, (3, 16, 16), batch_size=2, search_sparse=False)
    # A roomy budget: int8 is how it was costed, not what makes it fit (full fine-tuning, chosen when it
    # fits, freezes nothing: it is costed as float).
    roomy_budget = Budget(10**6, count_frozen_params=True, frozen_param_bits=8)
    full = memory.plan(model, roomy_budget, (3, 16, 16), batch_size=2, search_sparse=False)
    assert full.scheme.name == "full" and full.frozen_weights == "float"
    roomy = memory.plan(model, roomy_budget, (3, 16, 16), batch_size=2, search_sparse=False,
                        candidates=("bias",))  # fmt: skip
    assert roomy.frozen_weights == "int8" and not roomy.needs_int8
    assert "also fits with float32" in roomy.to_markdown()
    # Frozen weights kept out of the budget (a microcontroller's flash): nothing to hold in int8 here.
    flash = memory.plan(model, Budget(10**6, count_frozen_params=False, frozen_param_bits=8), (3, 16, 16),
                        batch_size=2, search_sparse=False)  # fmt: skip
    assert flash.frozen_weights == "float" and flash.float_needed_bytes is None
