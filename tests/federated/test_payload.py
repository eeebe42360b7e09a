from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from federated.compression import Compression
from federated.errors import PayloadError
from federated.payload import content_bytes, decode_update, encode_update, from_record, to_record


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
