from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvgM

from federated.aggregation import (
    apply_update,
    proximal_term,
    server_step,
    update_norm,
    weighted_average,
)
from ondevice.errors import ConfigError


@pytest.mark.parametrize("n_clients", [1, 2, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weighted_average_matches_numpy_average(n_clients: int, dtype: type) -> None:
    rng = np.random.default_rng(n_clients)
    updates = [
        {"b.bias": rng.normal(size=(7,)).astype(dtype), "a.weight": rng.normal(size=(3, 4)).astype(dtype)}
        for _ in range(n_clients)
    ]
    weights = rng.integers(1, 100, size=n_clients).tolist()
    got = weighted_average(updates, weights)
    assert list(got) == ["a.weight", "b.bias"]
    for key in got:
        expected = np.average(np.stack([u[key] for u in updates]), axis=0, weights=weights)
        assert got[key].dtype == dtype
        np.testing.assert_allclose(got[key], expected, rtol=1e-6, atol=1e-7)


def test_integer_tensors_are_rounded_back() -> None:
    got = weighted_average([{"n": np.array(3, np.int64)}, {"n": np.array(4, np.int64)}], [1, 3])
    assert got["n"].dtype == np.int64 and int(got["n"]) == 4


@pytest.mark.parametrize(
    ("updates", "weights", "match"),
    [
        ([], [], "at least one"),
        ([{"a": np.zeros(2)}], [1, 2], "weights"),
        ([{"a": np.zeros(2)}, {"b": np.zeros(2)}], [1, 1], "keys"),
        ([{"a": np.zeros(2)}, {"a": np.zeros(3)}], [1, 1], "shape"),
        ([{"a": np.zeros(2)}], [0], "positive"),
        ([{"a": np.zeros(2)}], [float("nan")], "positive"),
    ],
)
def test_weighted_average_rejects_bad_input(updates: list, weights: list, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        weighted_average(updates, weights)


def test_apply_update_and_norm() -> None:
    base = {"w": np.ones(3, np.float32)}
    out = apply_update(base, {"w": np.full(3, 2.0, np.float32)})
    np.testing.assert_array_equal(out["w"], np.full(3, 3.0))
    assert update_norm({"w": np.array([3.0, 4.0]), "n": np.array(100, np.int64)}) == pytest.approx(5.0)


def test_proximal_term_value_and_gradient() -> None:
    w = torch.randn(4, 3, requires_grad=True)
    anchor = torch.randn(4, 3)
    mu = 0.3
    term = proximal_term({"w": w}, {"w": anchor}, mu)
    expected = 0.5 * mu * float(((w.detach() - anchor) ** 2).sum())
    assert float(term.detach()) == pytest.approx(expected, rel=1e-6)
    term.backward()
    torch.testing.assert_close(w.grad, mu * (w.detach() - anchor))
    with pytest.raises(ConfigError, match="mu"):
        proximal_term({"w": w}, {"w": anchor}, -1.0)


def test_weighted_average_does_not_depend_on_the_order_of_the_replies() -> None:
    rng = np.random.default_rng(7)
    updates = [{"w": rng.normal(size=(64, 33)).astype(np.float32)} for _ in range(9)]
    weights = rng.integers(1, 50, size=9).tolist()
    first = weighted_average(updates, weights)["w"]
    for _ in range(5):
        order = rng.permutation(9)
        again = weighted_average([updates[i] for i in order], [weights[i] for i in order])["w"]
        np.testing.assert_array_equal(again, first)


def _fedavgm_reference(
    start: np.ndarray, deltas: list[np.ndarray], lr: float, momentum: float
) -> list[np.ndarray]:
    """FedAvgM written out, round by round (Hsu et al. 2019): v = m v + delta, w = w + lr v."""
    w, v, out = start.astype(np.float64), np.zeros(start.shape), []
    for delta in deltas:
        v = momentum * v + delta
        w = w + lr * v
        out.append(w.astype(start.dtype))
    return out


@pytest.mark.parametrize(("lr", "momentum"), [(1.0, 0.0), (1.0, 0.5), (0.7, 0.9), (1.5, 0.0)])
def test_server_momentum_matches_the_fedavgm_recurrence(lr: float, momentum: float) -> None:
    rng = np.random.default_rng(3)
    start = rng.normal(size=(5, 4)).astype(np.float32)
    deltas = [rng.normal(size=(5, 4)) * 0.1 for _ in range(4)]
    expected = _fedavgm_reference(start, deltas, lr, momentum)
    stats_start = np.ones(4, np.float32)
    stats_deltas = [rng.normal(size=4).astype(np.float32) for _ in range(4)]
    velocity: dict[str, np.ndarray] = {}
    arrays = {"w": start, "bn.running_mean": stats_start, "bn.num_batches_tracked": np.array(5, np.int64)}
    for i, delta in enumerate(deltas):
        update = {
            "w": delta.astype(np.float32),
            "bn.running_mean": stats_deltas[i],
            "bn.num_batches_tracked": np.array(2, np.int64),
        }
        step = server_step(arrays, update, velocity, lr=lr, momentum=momentum, plain=["bn.running_mean"])
        arrays, velocity = step.arrays, step.velocity
        np.testing.assert_allclose(arrays["w"], expected[i], rtol=1e-6, atol=1e-6)
        assert arrays["w"].dtype == np.float32
    # statistics and counters are averaged, never pushed by momentum or the server's learning rate
    np.testing.assert_allclose(
        arrays["bn.running_mean"], stats_start + np.sum(stats_deltas, axis=0), rtol=1e-6
    )
    assert int(arrays["bn.num_batches_tracked"]) == 5 + 2 * 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"momentum": 1.0}, r"\[0, 1\), got 1.0"),
        ({"momentum": -0.1}, r"\[0, 1\)"),
        ({"lr": 0.0}, "learning rate must be a number > 0, got 0.0"),
        ({"lr": True}, "learning rate"),
    ],
)
def test_server_momentum_rejects_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        server_step({}, {}, {}, **kwargs)


def _server_momentum_before_flower(
    base: dict[str, np.ndarray],
    update: dict[str, np.ndarray],
    velocity: dict[str, np.ndarray],
    lr: float,
    momentum: float,
    plain: frozenset[str],
) -> dict[str, np.ndarray]:
    """The server's step as it was before the server became Flower's FedAvgM (``ServerMomentum.step``),
    written out in numpy: ``velocity`` is updated in place."""
    if lr == 1.0 and momentum == 0.0:
        return {k: (base[k] + update[k]).astype(base[k].dtype) for k in sorted(base)}
    out = {}
    for key in sorted(base):
        value = update[key]
        if key in plain or not np.issubdtype(value.dtype, np.floating):
            out[key] = (base[key] + value).astype(base[key].dtype)
            continue
        v = value.astype(np.float64)
        if momentum:
            if key in velocity:
                v += momentum * velocity[key]
            velocity[key] = v
        out[key] = (base[key].astype(np.float64) + lr * v).astype(base[key].dtype)
    return out


@pytest.mark.parametrize(("lr", "momentum"), [(1.0, 0.0), (1.0, 0.5), (0.7, 0.9), (1.5, 0.0)])
def test_server_step_is_bit_identical_to_the_step_before_flower(lr: float, momentum: float) -> None:
    rng = np.random.default_rng(11)
    arrays = {
        "w": rng.normal(size=(6, 5)).astype(np.float32),
        "bn.running_var": np.ones(5, np.float32),
        "bn.num_batches_tracked": np.array(3, np.int64),
    }
    reference, velocity, reference_velocity = dict(arrays), {}, {}
    plain = frozenset({"bn.running_var"})
    for _ in range(5):
        update = {
            "w": (rng.normal(size=(6, 5)) * 0.01).astype(np.float32),
            "bn.running_var": (rng.normal(size=5) * 0.1).astype(np.float32),
            "bn.num_batches_tracked": np.array(4, np.int64),
        }
        step = server_step(arrays, update, velocity, lr=lr, momentum=momentum, plain=plain)
        arrays, velocity = step.arrays, step.velocity
        reference = _server_momentum_before_flower(reference, update, reference_velocity, lr, momentum, plain)
        for key in reference:
            assert arrays[key].dtype == reference[key].dtype, key
            np.testing.assert_array_equal(arrays[key], reference[key], err_msg=key)
    assert sorted(velocity) == sorted(reference_velocity) == (["w"] if momentum else [])


@pytest.mark.parametrize(("lr", "momentum"), [(1.0, 0.0), (0.7, 0.9), (1.5, 0.3)])
def test_server_step_is_flowers_fedavgm_on_the_weights(loopback_grid, lr: float, momentum: float) -> None:
    """On float weights the step is Flower's own ``FedAvgM.aggregate_train`` fed the devices' full weights
    (``loopback_grid`` only gives this process the identity Flower's messages need)."""
    rng = np.random.default_rng(5)
    flower = FedAvgM(server_learning_rate=lr, server_momentum=momentum)
    ours, velocity = {"w": rng.normal(size=(4, 3)).astype(np.float32)}, {}
    flower.current_arrays = ArrayRecord({"w": Array(ours["w"].copy())})
    for server_round in range(1, 4):
        deltas = [(rng.normal(size=(4, 3)) * 0.05).astype(np.float32) for _ in range(3)]
        weights = [5, 2, 9]
        replies = []
        for node, (delta, n) in enumerate(zip(deltas, weights, strict=True), start=1):
            content = RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(ours["w"] + delta)}),
                    "metrics": MetricRecord({"num-examples": n}),
                }
            )
            instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
            replies.append(Message(content, reply_to=instruction))
        expected, _ = flower.aggregate_train(server_round, replies)
        assert expected is not None
        step = server_step(
            ours, weighted_average([{"w": d} for d in deltas], weights), velocity, lr=lr, momentum=momentum
        )
        ours, velocity = step.arrays, step.velocity
        np.testing.assert_allclose(ours["w"], expected["w"].numpy(), rtol=1e-5, atol=1e-6)
        flower.current_arrays = ArrayRecord({"w": Array(ours["w"].copy())})
