"""The ClientApp and the server loop, in process: validation, aggregation, personalisation, state on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvgM, FedProx

from federated.apps import make_client_app, run_server
from federated.client import DeviceLearner, build_model, tensor_spec
from federated.config import FederatedConfig
from federated.records import from_record, to_numpy, to_record
from federated.strategy import SparseFedAvgM, SparseFedProx, make_strategy

SMALL_LR = {"name": "lite_residual", "expand": 0.125, "kernel_size": 3, "groups": 4}


def _config(**kwargs: object) -> FederatedConfig:
    base = {"scheme": SMALL_LR, "rounds": 1, "num_clients": 6, "partition": "iid", "lr": 3e-3}
    base.update(kwargs)
    return FederatedConfig(**base)  # type: ignore[arg-type]


def _poison(kind: str):
    def tamper(node: int, reply: Message) -> Message:
        update = reply.content["update"]
        arrays = from_record(update)
        name = sorted(arrays)[-1]
        if kind == "shape":
            arrays[name] = np.zeros((3, 3), np.float32)
        elif kind == "nan":
            arrays[name] = np.full_like(arrays[name], np.nan)
        elif kind == "huge":
            arrays = {k: v * 1e4 if v.dtype.kind == "f" else v for k, v in arrays.items()}
        elif kind == "keys":
            arrays["extra.weight"] = np.zeros(2, np.float32)
        elif kind == "dtype":
            arrays[name] = arrays[name].astype(np.float64)
        content = RecordDict(
            {
                "update": ArrayRecord({k: Array(v) for k, v in sorted(arrays.items())}),
                "aux": reply.content["aux"],
                "metrics": reply.content["metrics"],
            }
        )
        return Message(content=content, reply_to=_FakeInstruction.for_reply(reply))

    return tamper


class _FakeInstruction:
    @staticmethod
    def for_reply(reply: Message) -> Message:
        """An instruction whose reply comes from the same node as ``reply``."""
        return Message(RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type="train")


def test_poisoned_and_malformed_replies_are_rejected(loopback_grid, tmp_path: Path) -> None:
    config = _config(num_clients=8)
    kinds = {104: "shape", 105: "nan", 106: "huge", 107: "keys", 108: "dtype"}

    def tamper(node: int, reply: Message) -> Message:
        return _poison(kinds[node])(node, reply) if node in kinds else reply

    grid = loopback_grid(make_client_app(config, state_root=str(tmp_path)), 8, tamper=tamper)
    outcome = run_server(grid, config)
    record = outcome.rounds[0]
    assert record.replies == 8 and record.accepted == 3
    rejected = dict(record.rejected)
    assert sorted(rejected) == sorted(kinds)
    assert "(3, 3)" in rejected[104] and "NaN" in rejected[105] and "norm" in rejected[106]
    assert "wrong keys" in rejected[107] and "float64" in rejected[108]

    # The new global model is exactly what the honest devices alone give: start + numpy.average.
    prepared = build_model(config)
    spec = tensor_spec(prepared, personalised=False)
    start = to_numpy({k: v for k, v in prepared.trainable_tensors().items() if k in spec})
    honest = [reply for node, reply in grid.replies if node not in kinds]
    updates = [from_record(r.content["update"]) for r in honest]
    weights = [r.content["metrics"]["num-examples"] for r in honest]
    for key in spec:
        expected = start[key] + np.average(np.stack([u[key] for u in updates]), axis=0, weights=weights)
        np.testing.assert_allclose(
            outcome.arrays[key], expected.astype(start[key].dtype), rtol=1e-5, atol=1e-6
        )


def test_server_momentum_steps_as_fedavgm_over_rounds(loopback_grid, tmp_path: Path) -> None:
    """Three rounds of FedAvgM in the server loop against numpy: v = m v + mean delta, w = w + lr v."""
    lr, momentum = 0.8, 0.6
    config = _config(num_clients=3, rounds=3, server_lr=lr, server_momentum=momentum)
    grid = loopback_grid(make_client_app(config, state_root=str(tmp_path)), 3)
    outcome = run_server(grid, config)
    prepared = build_model(config)
    spec = tensor_spec(prepared, personalised=False)
    start = to_numpy({k: v for k, v in prepared.trainable_tensors().items() if k in spec})
    expected = {k: v.astype(np.float64) for k, v in start.items()}
    velocity = {k: np.zeros_like(v) for k, v in expected.items()}
    for first in range(0, len(grid.replies), 3):
        replies = [reply for _, reply in grid.replies[first : first + 3]]
        updates = [from_record(r.content["update"]) for r in replies]
        weights = [r.content["metrics"]["num-examples"] for r in replies]
        for key in spec:
            mean = np.average(np.stack([u[key] for u in updates]).astype(np.float64), axis=0, weights=weights)
            velocity[key] = momentum * velocity[key] + mean
            expected[key] = expected[key] + lr * velocity[key]
    assert len(grid.replies) == 9
    for key in spec:
        np.testing.assert_allclose(outcome.arrays[key], expected[key], rtol=1e-5, atol=1e-6)


def test_a_round_with_no_valid_reply_keeps_the_model(loopback_grid, tmp_path: Path) -> None:
    config = _config(num_clients=2)
    grid = loopback_grid(make_client_app(config, state_root=str(tmp_path)), 2, tamper=_poison("nan"))
    outcome = run_server(grid, config)
    prepared = build_model(config)
    for key, value in outcome.arrays.items():
        np.testing.assert_array_equal(value, prepared.trainable_tensors()[key].numpy())
    assert outcome.rounds[0].accepted == 0


@pytest.mark.parametrize("codec", ["fp16", "int8", "topk:0.1"])
def test_compressed_rounds_send_fewer_bytes(loopback_grid, tmp_path: Path, codec: str) -> None:
    plain = run_server(
        loopback_grid(make_client_app(_config(num_clients=2), state_root=str(tmp_path / "a")), 2),
        _config(num_clients=2),
    )
    config = _config(num_clients=2, compression=codec, downlink="fp16")
    packed = run_server(loopback_grid(make_client_app(config, state_root=str(tmp_path / "b")), 2), config)
    assert packed.rounds[0].accepted == 2
    assert packed.rounds[0].bytes_up < plain.rounds[0].bytes_up
    assert packed.rounds[0].bytes_down < plain.rounds[0].bytes_down
    assert packed.rounds[0].accuracy is not None


def test_personalised_heads_never_leave_the_device(loopback_grid, tmp_path: Path) -> None:
    config = _config(num_clients=2, personalised=True, rounds=2)
    grid = loopback_grid(make_client_app(config, state_root=str(tmp_path)), 2)
    outcome = run_server(grid, config)
    assert not any(k.startswith("classifier.") for k in outcome.arrays)
    for _, reply in grid.replies:
        assert not any(k.startswith("classifier.") for k in reply.content["update"])
    assert outcome.rounds[-1].accuracy is None and outcome.rounds[-1].client_accuracy is not None
    # Each device's own head is on its disk, and differs between devices.
    heads = [
        DeviceLearner(config, partition_id=i, num_partitions=2, state_dir=tmp_path / f"partition-{i}")
        for i in range(2)
    ]
    assert all(h.restored and h.rounds_trained == 2 for h in heads)
    w0, w1 = (h.prepared.trainable_tensors()["classifier.weight"] for h in heads)
    assert not np.allclose(w0.numpy(), w1.numpy())


def test_device_state_survives_a_restart(tmp_path: Path) -> None:
    config = _config(num_clients=2, compression="topk:0.05")
    prepared = build_model(config)
    spec = tensor_spec(prepared, personalised=False)
    start = to_numpy({k: v for k, v in prepared.trainable_tensors().items() if k in spec})
    first = DeviceLearner(config, partition_id=0, num_partitions=2, state_dir=tmp_path)
    first.train_round(start, server_round=1)
    first.residuals = {"classifier.weight": np.ones((10, 128), np.float32)}
    first.save_state()
    again = DeviceLearner(config, partition_id=0, num_partitions=2, state_dir=tmp_path)
    assert again.restored and again.rounds_trained == 1 and again.last_round == 1
    np.testing.assert_array_equal(again.residuals["classifier.weight"], np.ones((10, 128), np.float32))
    # Another lr (and no top-k uplink): what is trained is the same, so the state is kept; the residuals
    # of the top-k codec are not.
    other = DeviceLearner(
        _config(num_clients=2, lr=0.1), partition_id=0, num_partitions=2, state_dir=tmp_path
    )
    assert other.restored and other.rounds_trained == 1 and other.residuals == {}
    # Another scheme trains other tensors: that state is not reused.
    scheme = DeviceLearner(
        _config(num_clients=2, scheme="bias"), partition_id=0, num_partitions=2, state_dir=tmp_path
    )
    assert not scheme.restored and scheme.state_note and "scheme" in scheme.state_note


def test_replay_learner_state_survives_a_restart(tmp_path: Path) -> None:
    config = _config(num_clients=2, strategy="replay", buffer_size=40)
    prepared = build_model(config)
    spec = tensor_spec(prepared, personalised=False)
    start = to_numpy({k: v for k, v in prepared.trainable_tensors().items() if k in spec})
    first = DeviceLearner(config, partition_id=0, num_partitions=2, state_dir=tmp_path)
    update = first.train_round(start, server_round=1)
    first.save_state()
    assert first.learner.buffer is not None and len(first.learner.buffer) == 40
    assert 0.0 <= update.metrics["prequential-accuracy"] <= 1.0 and update.metrics["buffer-bytes"] > 0
    again = DeviceLearner(config, partition_id=0, num_partitions=2, state_dir=tmp_path)
    assert again.restored and again.samples_seen == first.samples_seen > 0
    assert again.learner.buffer is not None
    saved, restored = first.learner.buffer.state_tensors(), again.learner.buffer.state_tensors()
    assert sorted(saved) == sorted(restored)
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    for name, value in first.prepared.trainable_tensors().items():
        assert torch.equal(value, again.prepared.trainable_tensors()[name]), name


def test_fedprox_pulls_the_update_towards_the_global_model(tmp_path: Path) -> None:
    norms = {}
    for mu in (0.0, 10.0):
        extra = {"aggregation": "fedprox", "proximal_mu": mu} if mu else {}
        config = _config(num_clients=2, lr=1e-2, **extra)
        prepared = build_model(config)
        spec = tensor_spec(prepared, personalised=False)
        start = to_numpy({k: v for k, v in prepared.trainable_tensors().items() if k in spec})
        device = DeviceLearner(config, partition_id=0, num_partitions=2, state_dir=None)
        deltas = device.train_round(start, server_round=1).deltas
        norms[mu] = float(np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in deltas.values())))
    assert 0 < norms[10.0] < norms[0.0]


def test_metric_record_sample_count_is_validated(loopback_grid, tmp_path: Path) -> None:
    config = _config(num_clients=2)

    def lie(node: int, reply: Message) -> Message:
        if node != 101:
            return reply
        content = RecordDict(
            {
                "update": reply.content["update"],
                "aux": reply.content["aux"],
                "metrics": MetricRecord({"num-examples": 10**9}),
            }
        )
        return Message(content=content, reply_to=_FakeInstruction.for_reply(reply))

    grid = loopback_grid(make_client_app(config, state_root=str(tmp_path)), 2, tamper=lie)
    record = run_server(grid, config).rounds[0]
    assert record.accepted == 1 and "num-examples" in dict(record.rejected)[101]


@pytest.mark.parametrize(
    ("extra", "kind", "flower", "mu"),
    [
        ({}, SparseFedAvgM, FedAvgM, None),
        ({"aggregation": "fedprox", "proximal_mu": 0.1}, SparseFedProx, FedProx, 0.1),
    ],
)
def test_the_server_is_flowers_strategy_driven_by_its_start(
    loopback_grid, tmp_path: Path, extra: dict, kind: type, flower: type, mu: float | None
) -> None:
    config = _config(num_clients=2, rounds=2, **extra)
    strategy = make_strategy(config)
    assert isinstance(strategy, kind) and isinstance(strategy, flower)
    grid = loopback_grid(make_client_app(config, state_root=str(tmp_path)), 2)
    start = to_record(strategy.initial_arrays)
    instruction = next(iter(strategy.configure_train(1, start, ConfigRecord(), grid)))
    assert instruction.content["config"].get("proximal-mu") == mu  # FedProx tells the devices its mu
    strategy = make_strategy(config)
    result = strategy.start(
        grid, to_record(strategy.initial_arrays), num_rounds=2, evaluate_fn=strategy.evaluate_round
    )
    assert [r.round for r in strategy.records] == [1, 2] and len(grid.replies) == 4
    assert sorted(result.evaluate_metrics_serverapp) == [1, 2]  # round 0 (the start) is not evaluated
    assert result.evaluate_metrics_serverapp[2]["accuracy"] == strategy.records[-1].accuracy
    assert sorted(from_record(result.arrays)) == sorted(strategy.initial_arrays)
