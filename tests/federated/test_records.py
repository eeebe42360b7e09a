from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from federated.compression import Compression
from federated.errors import PayloadError
from federated.records import content_bytes, decode_update, encode_update, from_record, to_record


def test_round_trip_sorted_keys_and_scalars() -> None:
    tensors = {"z.bias": torch.randn(3), "a.weight": torch.randn(2, 2), "n": torch.tensor(5)}
    record = to_record(tensors)
    assert list(record) == ["a.weight", "n", "z.bias"]
    back = from_record(record)
    for key, value in tensors.items():
        np.testing.assert_array_equal(back[key], value.numpy())
        assert back[key].shape == tuple(value.shape)


def test_bytes_are_the_serialised_array_bytes() -> None:
    record = to_record({"w": np.zeros((10, 10), np.float32)})
    content = RecordDict({"arrays": record, "config": ConfigRecord({"x": 1})})
    assert content_bytes(content) == len(record["w"].data) >= 400


def test_non_numpy_arrays_are_refused() -> None:
    record = ArrayRecord({"w": Array(dtype="float32", shape=(1,), stype="pickle", data=b"\x80\x04K\x01.")})
    with pytest.raises(PayloadError, match="does not decode"):
        from_record(record)
    with pytest.raises(PayloadError, match="ArrayRecord"):
        from_record(ConfigRecord({"x": 1}))


@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "topk:0.2"])
def test_encode_decode_update(codec: str) -> None:
    compression = Compression.parse(codec)
    deltas = {
        "w": np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32),
        "n": np.array(2, np.int64),
    }
    spec = {k: (v.shape, v.dtype) for k, v in deltas.items()}
    encoded = encode_update(deltas, compression)
    out = decode_update(encoded.update, encoded.aux, spec, compression)
    assert sorted(out) == ["n", "w"] and out["w"].shape == (8, 5) and int(out["n"]) == 2
    with pytest.raises(PayloadError, match="wrong keys"):
        decode_update(encoded.update, encoded.aux, {"w": spec["w"]}, compression)


def test_topk_sends_running_statistics_dense_without_feedback() -> None:
    """A statistic re-estimated each round must land exactly on its target, not overshoot it.

    Each round the device's running mean is re-estimated to ``target`` from the global value, so the
    delta is ``target - global``. Sparsified with error feedback, the unsent remainder would be added to
    the next round's delta and the server's statistic would run past the target.
    """
    compression = Compression.parse("topk:0.1")
    rng = np.random.default_rng(1)
    target = rng.normal(size=40).astype(np.float32)
    weight_step = rng.normal(size=(40,)).astype(np.float32)
    spec = {"bn.running_mean": ((40,), np.dtype(np.float32)), "conv.weight": ((40,), np.dtype(np.float32))}

    def run(statistics: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        global_mean = np.zeros(40, np.float32)
        residuals: dict[str, np.ndarray] = {}
        for _ in range(5):
            deltas = {"bn.running_mean": target - global_mean, "conv.weight": weight_step}
            encoded = encode_update(deltas, compression, residuals, statistics=statistics)
            residuals = encoded.residuals
            out = decode_update(encoded.update, encoded.aux, spec, compression, statistics=statistics)
            global_mean = global_mean + out["bn.running_mean"]
        return global_mean, residuals

    dense, residuals = run(("bn.running_mean",))
    np.testing.assert_array_equal(dense, target)
    assert sorted(residuals) == ["conv.weight"]  # the weights keep their error feedback
    overshot, _ = run(())
    assert np.abs(overshot - target).max() > 0.5 * np.abs(target).max()


def test_statistics_sent_sparse_are_rejected_when_dense_is_expected() -> None:
    compression = Compression.parse("topk:0.25")
    deltas = {"bn.running_var": np.ones(8, np.float32)}
    spec = {"bn.running_var": ((8,), np.dtype(np.float32))}
    sparse = encode_update(deltas, compression)  # an old device that sparsifies its statistics
    with pytest.raises(PayloadError, match="running_var"):
        decode_update(sparse.update, sparse.aux, spec, compression, statistics=("bn.running_var",))
