"""Tensors to Flower ``ArrayRecord`` and back, under sorted keys, and the bytes a message really carries.

Arrays use Flower's standard numpy serialisation (``np.save`` without pickle, read back with
``allow_pickle=False``), so any Flower tool can read them. :func:`content_bytes` sums ``len(Array.data)``
over every ``ArrayRecord`` of a message: the serialised bytes on the wire, headers included.

An update message holds two records: ``"update"`` (one entry per shared tensor, the codec's values) and
``"aux"`` (int8 scales or top-k indices, same keys; empty for fp32/fp16). Downlink messages hold the
global tensors in ``"arrays"``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from federated.compression import Compression, EncodedTensor, codec_for, decode, encode_with_feedback
from federated.errors import PayloadError

__all__ = [
    "EncodedUpdate",
    "TensorSpec",
    "content_bytes",
    "decode_update",
    "downlink_arrays",
    "encode_update",
    "from_record",
    "record_bytes",
    "to_numpy",
    "to_record",
]

TensorSpec = Mapping[str, tuple[tuple[int, ...], np.dtype]]
"""name -> (shape, dtype) of every tensor a federation exchanges."""


def to_numpy(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, np.ndarray]:
    """CPU numpy copies of ``tensors``, sorted by name."""
    out: dict[str, np.ndarray] = {}
    for name in sorted(tensors):
        value = tensors[name]
        out[name] = (
            value.detach().cpu().numpy().copy() if isinstance(value, torch.Tensor) else np.array(value)
        )
    return out


def to_record(arrays: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` holding ``arrays`` in sorted key order."""
    numpy_arrays = to_numpy(arrays)
    # np.ascontiguousarray would turn a 0-d array into shape (1,); copy(order="C") keeps the shape.
    return ArrayRecord({name: Array(a.copy(order="C")) for name, a in numpy_arrays.items()})


def from_record(record: object) -> dict[str, np.ndarray]:
    """Decode an ``ArrayRecord`` into numpy arrays, never unpickling.

    Raises:
        PayloadError: not an ArrayRecord, an array not in numpy format, or bytes that do not parse.
    """
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"expected an ArrayRecord, got {type(record).__name__}")
    out: dict[str, np.ndarray] = {}
    for name in sorted(record):
        array = record[name]
        try:
            value = array.numpy()  # np.load(..., allow_pickle=False)
        except (TypeError, ValueError, OSError, EOFError) as exc:
            raise PayloadError(f"array {name!r} does not decode: {exc}") from None
        if value.dtype == object:
            raise PayloadError(f"array {name!r} has object dtype")
        out[name] = value
    return out


def downlink_arrays(arrays: Mapping[str, np.ndarray], precision: str) -> dict[str, np.ndarray]:
    """The global tensors as broadcast: float32 kept, or cast to float16 for ``precision="fp16"``."""
    if precision == "fp32":
        return dict(arrays)
    return {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in sorted(arrays.items())}


def record_bytes(record: ArrayRecord) -> int:
    """Serialised bytes of the arrays in ``record``."""
    return sum(len(array.data) for array in record.values())


def content_bytes(content: RecordDict) -> int:
    """Sum of the array bytes of every ``ArrayRecord`` in a message's content."""
    return sum(record_bytes(r) for r in content.values() if isinstance(r, ArrayRecord))


@dataclass(frozen=True, eq=False)
class EncodedUpdate:
    """An update ready to send: the two records and the device's new error-feedback residuals."""

    update: ArrayRecord
    aux: ArrayRecord
    residuals: dict[str, np.ndarray]


def encode_update(
    deltas: Mapping[str, np.ndarray],
    compression: Compression,
    residuals: Mapping[str, np.ndarray] | None = None,
    *,
    statistics: Collection[str] = (),
) -> EncodedUpdate:
    """Compress every delta (with error feedback for top-k) into ``update`` and ``aux`` records.

    ``statistics`` names the running-statistics tensors, which travel under :func:`codec_for`'s codec.
    """
    values: dict[str, np.ndarray] = {}
    aux: dict[str, np.ndarray] = {}
    new_residuals: dict[str, np.ndarray] = {}
    for name in sorted(deltas):
        codec = codec_for(compression, statistic=name in statistics)
        encoded, residual = encode_with_feedback(deltas[name], (residuals or {}).get(name), codec)
        values[name] = encoded.values
        if encoded.aux is not None:
            aux[name] = encoded.aux
        if residual is not None:
            new_residuals[name] = residual
    return EncodedUpdate(to_record(values), to_record(aux), new_residuals)


def decode_update(
    update: object,
    aux: object,
    spec: TensorSpec,
    compression: Compression,
    *,
    statistics: Collection[str] = (),
) -> dict[str, np.ndarray]:
    """Validate and decompress an update received from a device (``statistics`` as in :func:`encode_update`).

    Raises:
        PayloadError: missing or unexpected keys, arrays that do not fit the spec under the codec.
    """
    values = from_record(update)
    extras = from_record(aux) if aux is not None else {}
    if sorted(values) != sorted(spec):
        unexpected = sorted(set(values) - set(spec))
        missing = sorted(set(spec) - set(values))
        raise PayloadError(f"wrong keys: unexpected {unexpected[:3]}, missing {missing[:3]}")
    if set(extras) - set(spec):
        raise PayloadError(f"aux record has unexpected keys {sorted(set(extras) - set(spec))[:3]}")
    out: dict[str, np.ndarray] = {}
    for name in sorted(spec):
        shape, dtype = spec[name]
        try:
            out[name] = decode(
                EncodedTensor(values[name], extras.get(name)),
                shape=shape,
                dtype=dtype,
                compression=codec_for(compression, statistic=name in statistics),
            )
        except PayloadError as exc:
            raise PayloadError(f"{name!r}: {exc}") from None
    return out
