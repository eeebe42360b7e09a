"""Typed, validated payloads for frames: named tensors and JSON commands -- never pickle.

Tensor payload (little-endian)::

    count:u16, then per tensor:
        name_len:u16  name:utf-8  dtype:u8  ndim:u8  dims:u32*ndim  raw little-endian element bytes

Every field is checked on decode (known dtype, ndim <= 8, byte count = prod(dims) * itemsize, unique
non-empty names, no trailing bytes); anything else raises :class:`PayloadError`, which a link counts and
drops. Commands and replies are UTF-8 JSON objects with a string ``"op"`` (commands) and an object
``"args"``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ondevice.errors import OnDeviceError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPE_CODES",
    "PayloadError",
    "decode_command",
    "decode_tensors",
    "encode_command",
    "encode_tensors",
]

DTYPE_CODES: dict[str, int] = {
    "float32": 1,
    "float16": 2,
    "float64": 3,
    "int8": 4,
    "uint8": 5,
    "int16": 6,
    "int32": 7,
    "int64": 8,
}
"""Wire codes of the dtypes a tensor payload may carry (names as in numpy/torch)."""
_CODE_TO_NAME = {code: name for name, code in DTYPE_CODES.items()}
MAX_NDIM = 8
MAX_TENSORS = 4096


class PayloadError(OnDeviceError, ValueError):
    """A payload that does not follow the tensor or command encoding."""


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Encode named tensors (CPU copies, little-endian) in name order."""
    import numpy as np

    if len(tensors) > MAX_TENSORS:
        raise PayloadError(f"{len(tensors)} tensors exceed the limit of {MAX_TENSORS} per payload")
    out = bytearray(struct.pack("<H", len(tensors)))
    for name in sorted(tensors):
        tensor = tensors[name]
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in DTYPE_CODES:
            raise PayloadError(
                f"tensor {name!r} has dtype {dtype}; encodable dtypes are {', '.join(sorted(DTYPE_CODES))}"
            )
        if tensor.dim() > MAX_NDIM:
            raise PayloadError(f"tensor {name!r} has {tensor.dim()} dims; at most {MAX_NDIM} are encodable")
        encoded_name = name.encode("utf-8")
        if not encoded_name or len(encoded_name) > 0xFFFF:
            raise PayloadError(f"tensor name {name!r} must be 1..65535 UTF-8 bytes")
        array = (
            tensor.detach().cpu().contiguous().numpy().astype(np.dtype(dtype).newbyteorder("<"), copy=False)
        )
        out += struct.pack("<H", len(encoded_name)) + encoded_name
        out += struct.pack(f"<BB{tensor.dim()}I", DTYPE_CODES[dtype], tensor.dim(), *tensor.shape)
        out += array.tobytes()
    return bytes(out)


def decode_tensors(payload: bytes) -> dict[str, torch.Tensor]:
    """Decode and validate a tensor payload; raises :class:`PayloadError` on any inconsistency."""
    import numpy as np
    import torch

    view = memoryview(payload)

    def take(n: int, what: str) -> memoryview:
        nonlocal view
        if n > len(view):
            raise PayloadError(
                f"tensor payload truncated while reading {what} ({n} bytes wanted, {len(view)} left)"
            )
        chunk, view = view[:n], view[n:]
        return chunk

    (count,) = struct.unpack("<H", take(2, "the tensor count"))
    if count > MAX_TENSORS:
        raise PayloadError(f"payload announces {count} tensors, more than the limit {MAX_TENSORS}")
    tensors: dict[str, torch.Tensor] = {}
    for index in range(count):
        (name_len,) = struct.unpack("<H", take(2, f"name length of tensor #{index}"))
        try:
            name = bytes(take(name_len, f"name of tensor #{index}")).decode("utf-8")
        except UnicodeDecodeError:
            raise PayloadError(f"name of tensor #{index} is not UTF-8") from None
        if not name or name in tensors:
            raise PayloadError(f"tensor #{index} has an empty or repeated name {name!r}")
        code, ndim = struct.unpack("<BB", take(2, f"dtype of {name!r}"))
        if code not in _CODE_TO_NAME:
            raise PayloadError(f"tensor {name!r} has unknown dtype code {code}")
        if ndim > MAX_NDIM:
            raise PayloadError(f"tensor {name!r} has {ndim} dims; at most {MAX_NDIM} are allowed")
        shape = struct.unpack(f"<{ndim}I", take(4 * ndim, f"shape of {name!r}"))
        dtype = np.dtype(_CODE_TO_NAME[code]).newbyteorder("<")
        nbytes = math.prod(shape) * dtype.itemsize
        raw = take(nbytes, f"data of {name!r}")
        array = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)
        tensors[name] = torch.from_numpy(array)
    if len(view):
        raise PayloadError(f"{len(view)} unexpected trailing bytes after {count} tensors")
    return tensors


def encode_command(op: str, args: Mapping[str, Any] | None = None) -> bytes:
    """A command (or reply) as UTF-8 JSON: ``{"op": op, "args": {...}}``."""
    if not isinstance(op, str) or not op:
        raise PayloadError(f"a command needs a non-empty string op, got {op!r}")
    return json.dumps({"op": op, "args": dict(args or {})}, sort_keys=True, allow_nan=False).encode("utf-8")


def decode_command(payload: bytes) -> tuple[str, dict[str, Any]]:
    """``(op, args)`` of a command payload; raises :class:`PayloadError` if it is not one."""
    try:
        message = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PayloadError(f"command payload is not UTF-8 JSON: {error}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise PayloadError('a command must be a JSON object with a string "op"')
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise PayloadError('a command\'s "args" must be a JSON object')
    return message["op"], args
