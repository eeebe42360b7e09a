"""A federated device's state file is validated (kind and digest): a damaged or foreign one is refused
with a logged error, kept aside, and the device starts from the shared start and says so (issue 12)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from federated.config import FederatedConfig
from federated.device import STATE_FILE, DeviceLearner, build_model, tensor_spec
from federated.payload import to_numpy
from ondevice.checkpoint import KIND_FEDERATED_DEVICE_STATE, read_tensors

SMALL_LR = {"name": "lite_residual", "expand": 0.125, "kernel_size": 3, "groups": 4}


def _config() -> FederatedConfig:
    return FederatedConfig(scheme=SMALL_LR, rounds=1, num_clients=2, partition="iid", lr=3e-3)  # type: ignore[arg-type]


def _trained_device(state_dir: Path) -> DeviceLearner:
    config = _config()
    prepared = build_model(config)
    spec = tensor_spec(prepared, personalised=False)
    start = to_numpy({k: v for k, v in prepared.trainable_tensors().items() if k in spec})
    device = DeviceLearner(config, partition_id=0, num_partitions=2, state_dir=state_dir)
    device.train_round(start, server_round=1)
    device.save_state()
    return device


def _flip(path: Path, count: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "text", "learner-kind"])
def test_unusable_device_state_is_refused_logged_and_kept_aside(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    trained = _trained_device(tmp_path)
    state = tmp_path / STATE_FILE
    assert read_tensors(state)[1]["kind"] == KIND_FEDERATED_DEVICE_STATE
    if damage == "flip":
        _flip(state)
    elif damage == "text":
        state.write_text("not a state file")
    else:  # a plain learner checkpoint is not a device's state
        state.unlink()
        trained.learner.save(state)
    broken = state.read_bytes()
    with caplog.at_level(logging.ERROR, logger="federated.device"):
        device = DeviceLearner(_config(), partition_id=0, num_partitions=2, state_dir=tmp_path)
    assert not device.restored and device.state_error
    assert "refused" in caplog.text and "starting from the shared start" in caplog.text
    assert (tmp_path / (STATE_FILE + ".unusable")).read_bytes() == broken
    shared = DeviceLearner(_config(), partition_id=0, num_partitions=2, state_dir=None)
    for name, value in shared.prepared.trainable_tensors().items():
        assert torch.equal(device.prepared.trainable_tensors()[name], value), name
    device.save_state()  # the next save writes a valid state again
    again = DeviceLearner(_config(), partition_id=0, num_partitions=2, state_dir=tmp_path)
    assert again.restored and again.state_error is None
