"""The examples that are not tested beside their package run as they are, in a fast mode."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_plan_for_device(capsys: pytest.CaptureFixture[str]) -> None:
    chosen = load(EXAMPLES / "plan_for_device.py").main(["--device", "stm32f746", "--resolution", "64"])
    assert chosen.needed_bytes <= chosen.budget.total_bytes
    assert chosen.scheme.name in {"sparse", "bias", "last_layer", "lite_residual"}
    out = capsys.readouterr().out
    assert "train with: ondevice.prepare(model," in out


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.xdist_group("flower")
def test_federated_simulation_quick(capsys: pytest.CaptureFixture[str]) -> None:
    result = load(EXAMPLES / "federated_simulation.py").main(["--quick"])
    assert len(result.rounds) == 2 and result.final_accuracy is not None and result.final_accuracy > 0.3
    assert all(r.accepted == r.replies > 0 and r.bytes_up > 0 for r in result.rounds)
    assert "final accuracy" in capsys.readouterr().out
