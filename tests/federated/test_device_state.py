"""A federated device's state file is validated (kind and digest): a damaged or foreign one is refused
with a logged error, kept aside, and the device starts from the shared start and says so (issue 12)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from federated.client import STATE_FILE, DeviceLearner, build_model, tensor_spec
from federated.config import FederatedConfig
from federated.records import to_numpy
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
    with caplog.at_level(logging.ERROR, logger="federated.client"):
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


# -- a change of run configuration ---------------------------------------------------------------------
def _saved_tensors(device: DeviceLearner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in device.prepared.trainable_tensors().items()}


@pytest.mark.parametrize(
    "change",
    [
        {"rounds": 9},
        {"lr": 1e-3},
        {"local_epochs": 3, "round_timeout_s": 30.0, "min_replies": 2, "fraction_train": 0.5},
        {"compression": "int8", "downlink": "fp16", "norm_factor": 4.0},
    ],
)
def test_state_survives_a_change_that_does_not_change_what_is_trained(
    tmp_path: Path, change: dict, caplog: pytest.LogCaptureFixture
) -> None:
    trained = _trained_device(tmp_path)
    kept = _saved_tensors(trained)
    config = dataclasses.replace(_config(), **change)
    with caplog.at_level(logging.INFO, logger="federated.client"):
        device = DeviceLearner(config, partition_id=0, num_partitions=2, state_dir=tmp_path)
    assert device.restored and device.state_note is None and device.state_error is None
    assert device.rounds_trained == 1
    assert device.learner.lr == config.lr  # the run's lr, not the one saved
    for name, value in kept.items():
        assert torch.equal(device.prepared.trainable_tensors()[name], value), name
    changed = next(iter(change))
    assert f"run configuration changed ({changed} " in caplog.text or f", {changed} " in caplog.text


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"scheme": "bias"}, "scheme"),
        ({"classes": (0, 1, 2, 3, 4, 5, 6, 7, 8)}, "classes"),
        ({"frozen_weights": "int8"}, "frozen_weights"),
    ],
)
def test_state_trained_for_something_else_is_not_used_and_the_log_says_why(
    tmp_path: Path, change: dict, named: str, caplog: pytest.LogCaptureFixture
) -> None:
    _trained_device(tmp_path)
    config = dataclasses.replace(_config(), **change)
    with caplog.at_level(logging.WARNING, logger="federated.client"):
        device = DeviceLearner(config, partition_id=0, num_partitions=2, state_dir=tmp_path)
    assert not device.restored and device.rounds_trained == 0 and device.state_error is None
    assert device.state_note is not None and f"trained with another {named} " in device.state_note
    assert "cannot be used; it starts afresh" in caplog.text
    assert (tmp_path / STATE_FILE).exists()  # not damaged: replaced by the next save, not moved aside


def test_a_changed_learner_setup_keeps_the_trained_tensors_and_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trained = _trained_device(tmp_path)
    kept = _saved_tensors(trained)
    config = dataclasses.replace(_config(), strategy="replay", buffer_size=50)
    with caplog.at_level(logging.WARNING, logger="federated.client"):
        device = DeviceLearner(config, partition_id=0, num_partitions=2, state_dir=tmp_path)
    assert device.restored and device.rounds_trained == 1
    assert device.state_note is not None and "strategy 'naive' -> 'replay'" in device.state_note
    assert "kept its trained tensors" in caplog.text
    for name, value in kept.items():
        assert torch.equal(device.prepared.trainable_tensors()[name], value), name
    assert len(device.learner.buffer) == 0  # type: ignore[arg-type]


def test_the_server_log_says_when_a_device_could_not_keep_its_state(
    loopback_grid, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from flwr.app import Context, RecordDict

    from federated.apps import make_client_app, make_server_app

    def run(config: FederatedConfig) -> None:
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})  # type: ignore[arg-type]
        grid = loopback_grid(make_client_app(state_root=str(tmp_path)), 2)
        make_server_app(config)(grid, context)

    base = dataclasses.replace(_config(), num_clients=2)
    run(base)
    with caplog.at_level(logging.WARNING, logger="federated.strategy"):
        run(dataclasses.replace(base, rounds=2, lr=1e-3))  # kept: nothing to say
    assert "saved state" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="federated.strategy"):
        run(dataclasses.replace(base, scheme="bias"))
    lines = [r.getMessage() for r in caplog.records if r.name == "federated.strategy"]
    assert sum("its saved state was trained with another scheme" in line for line in lines) == 2
    assert any(line.startswith("round 1: node 101: its saved state") for line in lines)
