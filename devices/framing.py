"""Binary frames for a serial link: header + payload + CRC32, COBS-encoded, delimited by 0x00.

Wire format of one frame (all integers little-endian)::

    0x00 | COBS( version:u8 type:u8 flags:u8 seq:u32 length:u32 | payload | crc32:u32 ) | 0x00

The CRC (``zlib.crc32``) covers header and payload. COBS (Cheshire & Baker, "Consistent Overhead Byte
Stuffing", IEEE/ACM ToN 1999) removes every 0x00 from the encoded bytes at a cost of at most one byte in
254, so 0x00 marks frame boundaries unambiguously. A delimiter is sent *before and after* each frame:
garbage on the line between two frames (a device printing a boot banner, noise while plugging in) then
forms its own segment and is dropped, instead of corrupting the next frame.

:class:`FrameDecoder` is incremental: feed it whatever bytes arrived and get the complete, valid frames;
it counts every segment it rejects (``stats.dropped`` by reason) and never raises. COBS is 30 lines
here rather than a dependency (the ``cobs`` package is a C extension without aarch64 wheels for every
Python we support).
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from ondevice.errors import OnDeviceError

__all__ = [
    "PROTOCOL_VERSION",
    "DecoderStats",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameType",
    "cobs_decode",
    "cobs_encode",
    "decode_frame",
    "encode_frame",
]

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<BBBII")
CRC = struct.Struct("<I")
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 20
DELIMITER = b"\x00"


class FrameError(OnDeviceError, ValueError):
    """A byte segment is not a valid frame; ``reason`` says why (``cobs``, ``short``, ``crc``, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class FrameType(IntEnum):
    """What a frame carries."""

    ACK = 1
    """Acknowledges the frame with the same sequence number; empty payload. Sent on receipt, or only once
    the frame was processed, depending on the receiver's ``auto_ack`` (see :mod:`devices.link`)."""
    DATA = 2
    """Opaque bytes."""
    TENSORS = 3
    """Named tensors (parameter deltas), see :mod:`devices.payloads`."""
    COMMAND = 4
    """A command, a JSON object ``{"op": ..., "args": {...}}``."""
    REPLY = 5
    """A reply to a command, a JSON object."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    type: FrameType
    seq: int
    payload: bytes = b""
    flags: int = 0
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if not 0 <= self.seq <= 0xFFFFFFFF:
            raise FrameError("seq", f"sequence number must fit in 32 bits, got {self.seq}")
        if not 0 <= self.flags <= 0xFF:
            raise FrameError("flags", f"flags must fit in 8 bits, got {self.flags}")


def cobs_encode(data: bytes) -> bytes:
    """COBS-encode ``data``: the result contains no 0x00 byte."""
    out = bytearray()
    for block in bytes(data).split(b"\x00"):
        while len(block) >= 254:  # a full block (code 0xFF) carries no implied zero
            out.append(0xFF)
            out += block[:254]
            block = block[254:]
        out.append(len(block) + 1)  # each code implies the zero the split removed (the last one is dropped)
        out += block
    return bytes(out)


def cobs_decode(encoded: bytes) -> bytes:
    """Invert :func:`cobs_encode`; raises :class:`FrameError` (``cobs``) on malformed input."""
    out = bytearray()
    i, n = 0, len(encoded)
    while i < n:
        code = encoded[i]
        end = i + code
        if code == 0 or end > n:
            raise FrameError("cobs", f"malformed COBS block at byte {i} (code {code}, {n} bytes)")
        block = encoded[i + 1 : end]
        if 0 in block:
            raise FrameError("cobs", f"0x00 inside a COBS block at byte {i}")
        out += block
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


def encode_frame(frame: Frame) -> bytes:
    """The wire bytes of ``frame``, delimiters included."""
    body = HEADER.pack(frame.version, int(frame.type), frame.flags, frame.seq, len(frame.payload))
    body += frame.payload
    body += CRC.pack(zlib.crc32(body))
    return DELIMITER + cobs_encode(body) + DELIMITER


def decode_frame(segment: bytes, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Frame:
    """Decode one COBS segment (without delimiters); raises :class:`FrameError` naming the reason."""
    body = cobs_decode(segment)
    if len(body) < HEADER.size + CRC.size:
        raise FrameError("short", f"frame of {len(body)} bytes is shorter than header + CRC")
    (crc,) = CRC.unpack_from(body, len(body) - CRC.size)
    if zlib.crc32(body[: -CRC.size]) != crc:
        raise FrameError("crc", "CRC32 mismatch")
    version, type_code, flags, seq, length = HEADER.unpack_from(body)
    if version != PROTOCOL_VERSION:
        raise FrameError("version", f"protocol version {version}, expected {PROTOCOL_VERSION}")
    if length != len(body) - HEADER.size - CRC.size:
        raise FrameError(
            "length", f"header says {length} payload bytes, frame has {len(body) - HEADER.size - CRC.size}"
        )
    if length > max_payload_bytes:
        raise FrameError("oversize", f"payload of {length} bytes exceeds {max_payload_bytes}")
    try:
        frame_type = FrameType(type_code)
    except ValueError:
        raise FrameError("type", f"unknown frame type {type_code}") from None
    return Frame(frame_type, seq, body[HEADER.size : HEADER.size + length], flags, version)


@dataclass
class DecoderStats:
    """Frames decoded and segments dropped (by reason) by a :class:`FrameDecoder`."""

    frames: int = 0
    bytes_in: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    @property
    def dropped_total(self) -> int:
        """All dropped segments."""
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return {"frames": self.frames, "bytes_in": self.bytes_in, "dropped": dict(self.dropped)}


class FrameDecoder:
    """Split a byte stream at 0x00 delimiters and decode the frames; bad segments are counted, not raised.

    A segment longer than the largest valid frame is dropped as ``oversize`` as soon as it grows past that
    size (the rest of it, up to the next delimiter, is skipped), so garbage cannot grow memory.
    """

    def __init__(self, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self.max_payload_bytes = max_payload_bytes
        # COBS adds one byte per 254, plus the leading code byte.
        body = HEADER.size + max_payload_bytes + CRC.size
        self.max_segment_bytes = body + body // 254 + 2
        self.stats = DecoderStats()
        self._buffer = bytearray()
        self._skipping = False

    def reset(self) -> None:
        """Forget a partial segment (after a reconnect)."""
        if self._buffer and not self._skipping:
            self.stats.dropped["truncated"] += 1
        self._buffer.clear()
        self._skipping = False

    def feed(self, data: bytes) -> list[Frame]:
        """Consume ``data``; return the valid frames it completed, in order."""
        self.stats.bytes_in += len(data)
        frames: list[Frame] = []
        start = 0
        while True:
            zero = data.find(b"\x00", start)
            if zero < 0:
                break
            if self._skipping:
                self._skipping = False
                self._buffer.clear()
            else:
                self._buffer += data[start:zero]
                if self._buffer:
                    frame = self._decode(bytes(self._buffer))
                    if frame is not None:
                        frames.append(frame)
                    self._buffer.clear()
            start = zero + 1
        if not self._skipping:
            self._buffer += data[start:]
            if len(self._buffer) > self.max_segment_bytes:
                self.stats.dropped["oversize"] += 1
                self._buffer.clear()
                self._skipping = True
        return frames

    def _decode(self, segment: bytes) -> Frame | None:
        if len(segment) > self.max_segment_bytes:
            self.stats.dropped["oversize"] += 1
            return None
        try:
            frame = decode_frame(segment, max_payload_bytes=self.max_payload_bytes)
        except FrameError as error:
            self.stats.dropped[error.reason] += 1
            logger.debug("dropped frame segment (%s): %s", error.reason, error)
            return None
        self.stats.frames += 1
        return frame
