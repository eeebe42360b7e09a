from __future__ import annotations

import numpy as np
import pytest

from federated.compression import (
    Compression,
    EncodedTensor,
    decode,
    encode,
    encode_with_feedback,
    int8_error_bound,
)
from federated.errors import PayloadError
from ondevice.errors import ConfigError


def _roundtrip(x: np.ndarray, compression: Compression) -> np.ndarray:
    return decode(encode(x, compression), shape=x.shape, dtype=x.dtype, compression=compression)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp16_relative_error_bound(seed: int) -> None:
    x = np.random.default_rng(seed).normal(scale=0.1, size=(64, 9)).astype(np.float32)
    x[np.abs(x) < 1e-4] = 1e-3  # stay in fp16's normal range
    out = _roundtrip(x, Compression("fp16"))
    assert out.dtype == np.float32
    assert np.max(np.abs(out - x) / np.abs(x)) <= 2.0**-11


@pytest.mark.parametrize("scale", [1e-4, 1.0, 300.0])
def test_int8_absolute_error_bound(scale: float) -> None:
    x = np.random.default_rng(0).normal(scale=scale, size=(33, 5)).astype(np.float32)
    encoded = encode(x, Compression("int8"))
    assert encoded.values.dtype == np.int8 and encoded.aux is not None and encoded.aux.shape == (1,)
    out = _roundtrip(x, Compression("int8"))
    assert np.max(np.abs(out - x)) <= int8_error_bound(x) * (1 + 1e-5)


def test_int8_of_zeros_is_exact() -> None:
    x = np.zeros((4, 4), np.float32)
    np.testing.assert_array_equal(_roundtrip(x, Compression("int8")), x)


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5, 1.0])
def test_topk_keeps_the_largest_entries_exactly(ratio: float) -> None:
    x = np.random.default_rng(3).normal(size=(20, 10)).astype(np.float32)
    out = _roundtrip(x, Compression("topk", ratio=ratio))
    k = max(1, int(np.ceil(ratio * x.size)))
    kept = np.flatnonzero(out.reshape(-1))
    assert kept.size == k
    np.testing.assert_array_equal(out.reshape(-1)[kept], x.reshape(-1)[kept])
    threshold = np.sort(np.abs(x).reshape(-1))[-k]
    assert np.all(np.abs(x.reshape(-1)[kept]) >= threshold)


def test_error_feedback_loses_nothing() -> None:
    """sum of what was sent + the final residual == sum of all updates (Stich et al. 2018)."""
    rng = np.random.default_rng(5)
    compression = Compression("topk", ratio=0.05)
    residual = None
    sent_total = np.zeros((30, 4), np.float32)
    input_total = np.zeros((30, 4), np.float32)
    for _ in range(10):
        x = rng.normal(size=(30, 4)).astype(np.float32)
        input_total += x
        encoded, residual = encode_with_feedback(x, residual, compression)
        sent_total += decode(encoded, shape=x.shape, dtype=np.dtype(np.float32), compression=compression)
    assert residual is not None
    np.testing.assert_allclose(sent_total + residual, input_total, atol=1e-4)


def test_integer_tensors_travel_unchanged() -> None:
    x = np.array(7, np.int64)
    for kind in ("fp16", "int8", "topk"):
        np.testing.assert_array_equal(_roundtrip(x, Compression(kind)), x)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("encoded", "compression", "match"),
    [
        (EncodedTensor(np.zeros(4, np.float32)), Compression("fp16"), "float16"),
        (EncodedTensor(np.zeros(4, np.int8)), Compression("int8"), "scale"),
        (
            EncodedTensor(np.zeros(1, np.float32), np.array([9], np.int32)),
            Compression("topk", 0.25),
            "indices",
        ),
        (EncodedTensor(np.zeros(2, np.float32), np.array([0, 1], np.int32)), Compression("topk", 0.25), "1"),
        (EncodedTensor(np.zeros(5, np.float32)), Compression("none"), "expected"),
    ],
)
def test_decode_rejects_malformed_payloads(
    encoded: EncodedTensor, compression: Compression, match: str
) -> None:
    with pytest.raises(PayloadError, match=match):
        decode(encoded, shape=(4,), dtype=np.dtype(np.float32), compression=compression)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("none", Compression()), ("fp16", Compression("fp16")), ("topk:0.05", Compression("topk", 0.05))],
)
def test_parse(spec: str, expected: Compression) -> None:
    assert Compression.parse(spec) == expected
    assert Compression.parse(expected.spec()) == expected


@pytest.mark.parametrize("spec", ["topk:2", "topk:x", "int8:3", 5])
def test_parse_rejects(spec: object) -> None:
    with pytest.raises(ConfigError):
        Compression.parse(spec)  # type: ignore[arg-type]
