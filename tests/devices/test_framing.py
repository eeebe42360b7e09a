from __future__ import annotations

import random
import threading
import time

import pytest
import serial
import torch

from devices.framing import (
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    cobs_decode,
    cobs_encode,
    decode_frame,
    encode_frame,
)
from devices.payloads import PayloadError, decode_command, decode_tensors, encode_command, encode_tensors


@pytest.mark.parametrize("size", [0, 1, 2, 253, 254, 255, 507, 508, 1000])
@pytest.mark.parametrize("zeros", [0.0, 0.05, 0.5, 1.0])
def test_cobs_round_trip(size, zeros) -> None:
    rng = random.Random(size)
    data = bytes(0 if rng.random() < zeros else rng.randrange(1, 256) for _ in range(size))
    encoded = cobs_encode(data)
    assert 0 not in encoded
    assert len(encoded) <= size + size // 254 + 2
    assert cobs_decode(encoded) == data


@pytest.mark.parametrize(("encoded", "reason"), [(b"\x05ab", "cobs"), (b"\x02a\x00", "cobs")])
def test_cobs_rejects_malformed(encoded, reason) -> None:
    with pytest.raises(FrameError) as info:
        cobs_decode(encoded)
    assert info.value.reason == reason


def test_frame_round_trip_and_errors() -> None:
    frame = Frame(FrameType.TENSORS, 0xFFFFFFFF, b"\x00\x01payload\x00", flags=3)
    wire = encode_frame(frame)
    assert wire[0] == 0 and wire[-1] == 0 and 0 not in wire[1:-1]
    assert decode_frame(wire[1:-1]) == frame
    body = bytearray(cobs_decode(wire[1:-1]))
    body[12] ^= 0x10
    with pytest.raises(FrameError, match="CRC32") as info:
        decode_frame(cobs_encode(bytes(body)))
    assert info.value.reason == "crc"
    with pytest.raises(FrameError, match="exceeds 10"):
        decode_frame(encode_frame(Frame(FrameType.DATA, 1, b"x" * 100))[1:-1], max_payload_bytes=10)


def corrupted_stream(n: int, rate: float, seed: int) -> tuple[bytes, list[Frame], int]:
    """n frames, ``rate`` of them corrupted by a bit flip, a truncation, or garbage before them.

    Returns the stream, the frames that must come through, and how many bad segments it holds (garbage
    right after a truncated frame merges with it into one segment).
    """
    rng = random.Random(seed)
    bad = set(rng.sample(range(n), int(n * rate)))
    chunks: list[bytes] = []
    expected: list[Frame] = []
    bad_segments = 0
    previous = "ok"
    for i in range(n):
        frame = Frame(FrameType.DATA, i, rng.randbytes(rng.randrange(0, 40)))
        wire = encode_frame(frame)
        kind = ("flip", "truncate", "garbage")[i % 3] if i in bad else "ok"
        if kind == "flip":
            body = bytearray(wire[1:-1])
            while True:
                j, bit = rng.randrange(len(body)), rng.randrange(8)
                if body[j] ^ (1 << bit):  # a flip to 0x00 would split the frame in two segments
                    body[j] ^= 1 << bit
                    break
            wire = b"\x00" + bytes(body) + b"\x00"
        elif kind == "truncate":
            wire = wire[: rng.randrange(2, len(wire) - 1)]  # the next frame's leading 0x00 ends it
        elif kind == "garbage":
            wire = bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 40))) + wire
        if kind in ("ok", "garbage"):
            expected.append(frame)
        if kind != "ok" and not (kind == "garbage" and previous == "truncate"):
            bad_segments += 1
        previous = kind
        chunks.append(wire)
    chunks.append(b"\x00")
    return b"".join(chunks), expected, bad_segments


def check_decoded(decoder: FrameDecoder, frames: list[Frame], expected: list[Frame], corrupted: int) -> None:
    assert [(f.seq, f.payload) for f in frames] == [
        (f.seq, f.payload) for f in expected
    ]  # none lost or doubled
    assert decoder.stats.dropped_total == corrupted  # every corruption detected exactly once
    assert decoder.stats.frames == len(expected)


def test_decoder_in_odd_chunks() -> None:
    stream, expected, corrupted = corrupted_stream(2000, 0.05, seed=1)
    rng = random.Random(2)
    decoder = FrameDecoder()
    frames: list[Frame] = []
    i = 0
    while i < len(stream):
        step = rng.randrange(1, 64)
        frames += decoder.feed(stream[i : i + step])
        i += step
    check_decoded(decoder, frames, expected, corrupted)


def test_decoder_drops_oversize_garbage() -> None:
    decoder = FrameDecoder(max_payload_bytes=64)
    good = Frame(FrameType.DATA, 7, b"ok")
    frames = decoder.feed(b"\x01" * 1000) + decoder.feed(b"\x02" * 1000 + encode_frame(good))
    assert frames == [good] and decoder.stats.dropped["oversize"] == 1


def read_frames(
    read, decoder: FrameDecoder, wanted: int, corrupted: int, timeout_s: float = 30
) -> list[Frame]:
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout_s
    while (len(frames) < wanted or decoder.stats.dropped_total < corrupted) and time.monotonic() < deadline:
        frames += decoder.feed(read())
    return frames


@pytest.mark.slow
def test_10k_frames_5pct_corrupted_over_loop_url() -> None:
    stream, expected, corrupted = corrupted_stream(10_000, 0.05, seed=3)
    port = serial.serial_for_url("loop://", timeout=0.05)
    writer = threading.Thread(
        target=lambda: [port.write(stream[i : i + 512]) for i in range(0, len(stream), 512)]
    )
    writer.start()
    decoder = FrameDecoder()
    frames = read_frames(lambda: port.read(max(1, port.in_waiting)), decoder, len(expected), corrupted)
    writer.join()
    port.close()
    check_decoded(decoder, frames, expected, corrupted)


@pytest.mark.integration
def test_10k_frames_5pct_corrupted_over_pty(pty_pair) -> None:
    device, path = pty_pair
    stream, expected, corrupted = corrupted_stream(10_000, 0.05, seed=4)
    host = serial.serial_for_url(path, timeout=0.05)
    writer = threading.Thread(
        target=lambda: [device.write(stream[i : i + 997]) for i in range(0, len(stream), 997)]
    )
    writer.start()
    decoder = FrameDecoder()
    frames = read_frames(lambda: host.read(max(1, host.in_waiting)), decoder, len(expected), corrupted)
    writer.join()
    host.close()
    check_decoded(decoder, frames, expected, corrupted)


def test_tensor_payload_round_trip() -> None:
    tensors = {
        "conv.bias": torch.randn(8),
        "fc.weight": torch.randn(3, 4, dtype=torch.float64),
        "q": torch.randint(-128, 127, (2, 2, 2), dtype=torch.int8),
        "scalar": torch.tensor(3, dtype=torch.int64),
        "empty": torch.zeros(0, 5, dtype=torch.float16),
    }
    decoded = decode_tensors(encode_tensors(tensors))
    assert list(decoded) == sorted(tensors)
    for name, value in tensors.items():
        assert decoded[name].dtype == value.dtype and torch.equal(decoded[name], value)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\x00", "trailing"),
        (lambda b: b[:2] + b"\x00\x00" + b[4:], "empty or repeated name"),
        (lambda b: b[:5] + b"\x63" + b[6:], "unknown dtype code 99"),
        (lambda b: b[:6] + b"\x09" + b[7:], "at most 8"),
        (lambda b: b"\xff\xff", "more than the limit"),
    ],
)
def test_tensor_payload_rejects_bad_input(mutate, match) -> None:
    good = encode_tensors({"w": torch.ones(2, 3)})  # count, name_len, 'w', dtype@5, ndim@6, dims, data
    with pytest.raises(PayloadError, match=match):
        decode_tensors(mutate(good))


def test_tensor_payload_refuses_unsupported_dtype() -> None:
    with pytest.raises(PayloadError, match="bfloat16"):
        encode_tensors({"w": torch.ones(2, dtype=torch.bfloat16)})


def test_command_payloads() -> None:
    assert decode_command(encode_command("ping", {"seq": 3})) == ("ping", {"seq": 3})
    for bad in (b"\xff", b"[1]", b'{"op": 1}', b'{"op": "x", "args": []}'):
        with pytest.raises(PayloadError):
            decode_command(bad)
