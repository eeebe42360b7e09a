from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
@pytest.mark.slow
def test_serial_to_learner_quick() -> None:
    result = load(EXAMPLES / "serial_to_learner.py").main(["--quick", "--readings", "640"])
    assert result["windows"] == (640 - 32) // 16 + 1  # every reading arrived and was windowed
    assert result["last_loss"] < result["first_loss"]
    assert result["accuracy_last_100"] > 0.6  # the learner really learned the two gestures (chance: 0.5)


@pytest.mark.integration
def test_fleet_walkthrough(tmp_path: Path) -> None:
    codes = load(EXAMPLES / "fleet" / "walkthrough.py").main(["--quick", "--workdir", str(tmp_path)])
    assert codes == {"check": 1, "provision": 0, "start": 0, "status": 1, "logs": 0, "restart": 0, "stop": 0}
    assert (tmp_path / "pi-kitchen" / "systemd" / "ondevice-supernode.service").exists()


def test_example_inventory_is_valid() -> None:
    from devices.fleet import load_inventory

    inventory = load_inventory(EXAMPLES / "fleet" / "inventory.toml")
    assert [h.name for h in inventory.hosts] == ["pi-kitchen", "pi-garage", "pi-zero-porch"]
    assert inventory.hosts[2].port == 2222 and inventory.hosts[1].node.partition_id == 1
