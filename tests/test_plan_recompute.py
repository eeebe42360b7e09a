"""The planner weighs recomputation by its memory and its compute, both estimated; FLOPs are counted right."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner, Result

import memory
import ondevice
from memory.flops import FlopCount
from ondevice.cli import app
from ondevice.errors import BudgetExceededError, ConfigError
from ondevice.models import create_model

BATCH = 8


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        # forward: 2*B*20*64 + 2*B*64*5; weight gradients: the same again; the input gradient of the
        # second layer (the first one's input needs none): 2*B*64*5
        ("full", 2 * 6 * (2 * 20 * 64 + 3 * 64 * 5)),
        # bias (+ the head, which the scheme trains): no first-layer weight gradient, but backward still
        # reaches the first layer's bias through the second layer's input gradient
        ("bias", 2 * 6 * (20 * 64 + 3 * 64 * 5)),
    ],
)
def test_step_flops_are_the_matmuls_of_forward_and_backward(scheme: str, expected: int) -> None:
    model = ondevice.prepare(_mlp(), scheme)
    assert memory.estimate(model, (6, 20)).step_flops == expected


@pytest.mark.parametrize("name", ["vit", "cnn"])
def test_estimated_flops_equal_those_of_a_real_step_with_and_without_recompute(name: str) -> None:
    torch.manual_seed(0)
    net = create_model(name, num_classes=10)
    flops = {}
    for recompute in (False, True):
        prepared = ondevice.prepare(net, "bias", recompute=recompute)
        estimated = memory.estimate(prepared, batch_size=4)
        with FlopCount() as real:
            memory.measure(prepared, torch.randn(4, *prepared.model.input_shape))
        assert estimated.step_flops == real.total > 0
        flops[recompute] = real.total
    assert flops[True] > flops[False]  # one more forward of each block


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    return create_model("vit", num_classes=10)


def _needed(model: nn.Module, recompute: bool, budget: memory.Budget) -> int:
    prepared = ondevice.prepare(model, "bias", recompute=recompute)
    return memory.budget_bytes_needed(memory.estimate(prepared, batch_size=BATCH), budget)


@pytest.mark.slow
def test_plan_recomputes_where_that_is_what_makes_the_scheme_fit(vit: nn.Module) -> None:
    probe = memory.Budget.parse("1GiB")
    exact, recomputed = _needed(vit, False, probe), _needed(vit, True, probe)
    assert recomputed < exact / 2
    tight = memory.Budget.parse((recomputed + exact) // 2)
    plan = memory.plan(vit, tight, batch_size=BATCH, candidates=["last_layer", "bias"], search_sparse=False)
    assert plan.scheme.name == "bias" and plan.recompute
    assert plan.exact_needed_bytes == exact and not tight.fits(exact)
    assert plan.report.step_flops is not None and plan.exact_flops is not None
    assert plan.report.step_flops > plan.exact_flops
    assert "recompute=True" in plan.prepare_call() and "Recomputes" in plan.to_markdown()
    assert json.loads(json.dumps(plan.to_dict()))["recompute"] == list(plan.recompute)
    # the plan's figure is the real step's: measured on the model prepared as the plan says
    prepared = ondevice.prepare(vit, plan.scheme, recompute=True)
    assert prepared.recompute == plan.recompute
    measured = memory.measure(prepared, torch.randn(BATCH, *prepared.model.input_shape))
    assert tight.fits(memory.budget_bytes_needed(measured, tight))
    assert abs(measured.activation_bytes - plan.report.activation_bytes) <= 0.02 * measured.activation_bytes

    # with room for the exact step, the same gain costs less compute without recomputation
    roomy = memory.plan(vit, probe, batch_size=BATCH, candidates=["last_layer", "bias"], search_sparse=False)
    assert roomy.scheme.name == "bias" and roomy.recompute == () and roomy.exact_flops is None
    weighed = {(c.scheme["name"], c.recompute) for c in roomy.considered}
    assert ("bias", True) in weighed
    assert ("last_layer", True) not in weighed  # backward never reaches a block: nothing to recompute

    # not allowed to recompute, the tight budget leaves only the head
    head_only = memory.plan(vit, tight, batch_size=BATCH, candidates=["last_layer", "bias"],
                            search_sparse=False, recompute=False)  # fmt: skip
    assert head_only.scheme.name == "last_layer" and not any(c.recompute for c in head_only.considered)


def test_plan_weighs_recompute_on_a_cnn_and_skips_it_where_it_costs_memory() -> None:
    torch.manual_seed(0)
    net = create_model("cnn", num_classes=10)
    plan = memory.plan(net, "1GiB", batch_size=BATCH, candidates=["bias"], search_sparse=False)
    assert plan.recompute == ()
    rows = {c.recompute: c for c in plan.considered}
    assert set(rows) == {False, True}
    assert rows[True].needed_bytes > rows[False].needed_bytes  # 1-bit masks are smaller than block inputs
    assert rows[True].step_flops is not None and rows[False].step_flops is not None
    assert rows[True].step_flops > rows[False].step_flops


@pytest.mark.slow
def test_cli_plan_recompute_flags(vit: nn.Module) -> None:
    runner = CliRunner()
    scheme = runner.invoke(app, ["plan", "--model", "vit", "--scheme", "bias", "--recompute",
                                 "--batch-size", "8", "--json"])  # fmt: skip
    assert scheme.exit_code == 0, scheme.output
    payload = json.loads(scheme.stdout)
    assert payload["recompute"] and payload["report"]["step_flops"] > 0
    expected = memory.estimate(ondevice.prepare(vit, "bias", recompute=True), batch_size=8)
    assert payload["report"]["activation_bytes"] == expected.activation_bytes

    text = runner.invoke(app, ["plan", "--model", "vit", "--scheme", "bias", "--recompute"])  # stderr
    assert text.exit_code == 0 and f"Recomputes {len(payload['recompute'])} block(s)" in text.output

    probe = memory.Budget.parse("1GiB")
    tight = (_needed(vit, True, probe) + _needed(vit, False, probe)) // 2
    args = ["plan", "--model", "vit", "--budget", str(tight), "--batch-size", "8", "--json"]
    planned = json.loads(_ok(runner.invoke(app, args)))["plan"]
    assert any(c["recompute"] for c in planned["considered"])
    assert planned["prepare_call"].endswith("recompute=True)") == bool(planned["recompute"])
    refused = json.loads(_ok(runner.invoke(app, [*args, "--no-recompute"])))["plan"]
    assert refused["recompute"] == [] and not any(c["recompute"] for c in refused["considered"])


def _ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.slow
def test_plan_costs_a_lossy_compression_when_asked_and_says_when_it_would_fit(vit: nn.Module) -> None:
    kwargs: dict[str, Any] = {"batch_size": BATCH, "candidates": ["bias"], "search_sparse": False,
                              "recompute": False}  # fmt: skip
    exact = memory.plan(vit, "1GiB", **kwargs)
    lossy = memory.plan(vit, "1GiB", **kwargs, compress="2bit")
    assert lossy.compress == "2bit" and "compress='2bit'" in lossy.prepare_call()
    assert lossy.needed_bytes < exact.needed_bytes
    prepared = ondevice.prepare(vit, "bias", compress="2bit")
    measured = memory.measure(prepared, torch.randn(BATCH, *prepared.model.input_shape))
    assert abs(measured.activation_bytes - lossy.report.activation_bytes) <= 0.02 * measured.activation_bytes
    tight = (exact.needed_bytes + lossy.needed_bytes) // 2
    with pytest.raises(BudgetExceededError, match=r"with compress='2bit' bias fits"):
        memory.plan(vit, tight, **kwargs)
    assert memory.plan(vit, tight, **kwargs, compress="2bit").scheme.name == "bias"
    # a ReLU network has nothing to compress: planned as it is
    torch.manual_seed(0)
    assert (
        memory.plan(create_model("cnn", num_classes=10), "1GiB", **kwargs, compress="2bit").compress is None
    )
    with pytest.raises(ConfigError, match="compress must be None, 'int8' or '2bit'"):
        memory.plan(vit, "1GiB", **kwargs, compress="3bit")  # type: ignore[arg-type]

    runner = CliRunner()
    bad = runner.invoke(app, ["plan", "--model", "vit", "--budget", "1GiB", "--compress", "3bit"])
    assert bad.exit_code == 2 and "--compress must be none, int8 or 2bit" in bad.output
    args = ["plan", "--model", "vit", "--budget", str(tight), "--batch-size", str(BATCH), "--json"]
    assert json.loads(_ok(runner.invoke(app, [*args, "--compress", "2bit"])))["plan"]["compress"] == "2bit"
