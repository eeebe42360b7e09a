"""The apps on Flower's Simulation Engine: ``federated.simulate`` and ``ondevice simulate --json``.

Bytes are checked against the tensors that must travel: every sampled device receives the shared tensors
at the downlink precision, and replies with them at the uplink codec's width.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array

from federated.client import DeviceLearner, build_model, tensor_spec
from federated.config import FederatedConfig
from federated.simulation import simulate

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("flower")]

SMALL_LR = {"name": "lite_residual", "expand": 0.125, "kernel_size": 3, "groups": 4, "downsample": 1}


def _shared_bytes(config: FederatedConfig, float_dtype: type[np.floating]) -> int:
    """Serialised bytes (``flwr.app.Array``: .npy header + data) of the shared tensors, floats as
    ``float_dtype``: what one device receives."""
    spec = tensor_spec(build_model(config), personalised=config.personalised)
    return sum(
        len(Array(np.zeros(shape, float_dtype if dtype.kind == "f" else dtype)).data)
        for shape, dtype in spec.values()
    )


def test_simulate_runs_rounds_on_the_simulation_engine(tmp_path: Path) -> None:
    config = FederatedConfig(
        scheme=SMALL_LR,
        num_clients=3,
        rounds=2,
        partition="iid",
        local_epochs=1,
        lr=1e-2,
        strategy="replay",
        buffer_size=32,
        compression="fp16",
        downlink="fp16",
    )
    seen: list[int] = []
    result = simulate(config, state_dir=tmp_path, on_round=lambda r: seen.append(r.round))
    assert seen == [1, 2] and [r.round for r in result.rounds] == [1, 2]
    per_device = _shared_bytes(config, np.float16)
    for record in result.rounds:
        assert record.sampled == record.replies == record.accepted == 3 and not record.rejected
        assert record.bytes_down == 3 * per_device  # what the server broadcast, fp16
        assert record.bytes_up >= 3 * per_device  # fp16 deltas (+ codec side information, if any)
        assert record.accuracy is not None and 0.0 <= record.accuracy <= 1.0
    assert result.final_accuracy is not None and result.final_accuracy > 0.3  # 10 classes: chance is 0.1
    # Each device's learner (its replay buffer included) is on its disk after the run.
    states = sorted(tmp_path.glob("partition-*/device.safetensors"))
    assert len(states) == 3
    learner = DeviceLearner(config, partition_id=0, num_partitions=3, state_dir=states[0].parent)
    assert learner.restored and learner.rounds_trained == 2 and learner.learner.buffer_bytes > 0


def test_cli_simulate_json(tmp_path: Path) -> None:
    # A Ray session started earlier in this process may have put the test folders on PYTHONPATH, where
    # tests/federated would shadow the federated package: the console script runs without it.
    env = {
        **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    exe = Path(sys.executable).parent / "ondevice"
    args = [str(exe), "simulate", "--clients", "3", "--rounds", "1", "--local-epochs", "1"]
    args += ["--partition", "iid", "--scheme", json.dumps(SMALL_LR), "--json"]
    args += ["--frozen-weights", "int8", "--ship-backbone"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    payload = json.loads(done.stdout)
    config = FederatedConfig.from_dict(payload["config"])
    # The CLI's defaults are the API's: the same options give the same federation (lr, epochs, ...).
    assert config == FederatedConfig(
        num_clients=3, rounds=1, local_epochs=1, partition="iid", scheme=SMALL_LR, frozen_weights="int8",
        ship_backbone=True,
    )
    assert payload["interrupted"] is False
    (record,) = payload["rounds"]
    assert record["round"] == 1 and record["accepted"] == 3
    assert 0.0 <= record["accuracy"] <= 1.0 and payload["final_accuracy"] == record["accuracy"]
    # fp32 broadcast to 3 devices, and the int8 backbone once to each
    assert len(record["backbone_sent"]) == 3 and record["backbone_bytes"] > 0
    assert record["bytes_down"] == 3 * _shared_bytes(config, np.float32) + record["backbone_bytes"]
    assert record["bytes_up"] > 0
    assert payload["bytes_down_total"] == record["bytes_down"]
    assert payload["bytes_up_total"] == record["bytes_up"]
