from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import serial
import torch

from devices.framing import Frame, FrameType, encode_frame
from devices.link import Link
from devices.payloads import decode_command, decode_tensors
from devices.ports import Backoff, PtyPort, ReconnectingPort
from devices.testing.emulator import DeviceEmulator


class Corrupting:
    """Wraps a port and corrupts ``rate`` of the frames written through it (bit flip or truncation)."""

    def __init__(self, port, rate: float, seed: int) -> None:
        self.port = port
        self.rate = rate
        self.rng = random.Random(seed)
        self.corrupted = 0

    @property
    def in_waiting(self) -> int:
        return self.port.in_waiting

    def read(self, size: int = 1) -> bytes:
        return self.port.read(size)

    def write(self, data: bytes) -> int:
        if self.rng.random() < self.rate:
            self.corrupted += 1
            body = bytearray(data[1:-1])
            if self.rng.random() < 0.5:
                while True:
                    j, bit = self.rng.randrange(len(body)), self.rng.randrange(8)
                    if body[j] ^ (1 << bit):  # a flip to 0x00 would split the frame
                        body[j] ^= 1 << bit
                        break
                data = b"\x00" + bytes(body) + b"\x00"
            else:
                data = b"\x00" + bytes(body[: self.rng.randrange(1, len(body))]) + b"\x00"
        return self.port.write(data)

    def close(self) -> None:
        self.port.close()


def host_link(path: str, *, rate: float = 0.0, seed: int = 0, **kwargs) -> tuple[Link, list[Corrupting]]:
    wrappers: list[Corrupting] = []

    def opener() -> Corrupting:
        wrappers.append(Corrupting(serial.serial_for_url(path, timeout=0.02), rate, seed + len(wrappers)))
        return wrappers[-1]

    options = {"ack_timeout_s": 0.05, "backoff": Backoff(initial_s=0.01, max_s=0.2)} | kwargs
    return Link(opener, name="host", **options), wrappers


@pytest.mark.integration
def test_link_delivers_exactly_once_through_corruption(pty_pair) -> None:
    device_port, path = pty_pair
    device_side = Corrupting(device_port, 0.05, seed=11)  # corrupts ACKs -> retransmissions -> duplicates
    once = ReconnectingPort(lambda: device_side, backoff=Backoff(max_attempts=1))
    host, wrappers = host_link(path, rate=0.05, seed=12)
    n = 300
    with DeviceEmulator(once, parameters={"w": torch.zeros(4)}, ack_timeout_s=0.05) as device, host:
        for i in range(n):
            assert host.send_tensors({"w": torch.full((4,), float(i))})
        assert host.send_command("get")
        reply = host.receive(timeout_s=5)
        assert reply is not None and reply.type is FrameType.TENSORS
        deadline = time.monotonic() + 5  # let the device read the host's last ACK
        while device.link.decoder.stats.dropped_total < wrappers[0].corrupted and time.monotonic() < deadline:
            time.sleep(0.01)
    expected = torch.full((4,), float(sum(range(n))))
    assert torch.equal(device.parameters["w"], expected) and device.applied == n  # none lost, none twice
    assert torch.equal(decode_tensors(reply.payload)["w"], expected)
    assert wrappers[0].corrupted > 0 and device_side.corrupted > 0
    assert host.stats.retransmissions >= wrappers[0].corrupted  # every corrupted frame was resent
    assert device.link.decoder.stats.dropped_total == wrappers[0].corrupted  # and detected
    assert device.link.stats.duplicates > 0  # lost ACKs made the host resend delivered frames
    assert device.link.stats.delivered == n + 1 and host.stats.send_failures == 0


@pytest.mark.integration
def test_commands_and_replies(pty_pair) -> None:
    device_port, path = pty_pair
    host, _ = host_link(path)
    with DeviceEmulator(device_port, parameters={"b": torch.ones(2)}), host:
        assert host.send_command("ping", {"seq": 7})
        frame = host.receive(timeout_s=5)
        assert frame.type is FrameType.REPLY and decode_command(frame.payload) == ("pong", {"seq": 7})
        assert host.send_command("bogus")
        assert decode_command(host.receive(timeout_s=5).payload)[0] == "error"
        assert host.send(FrameType.TENSORS, b"\x01\x00garbage")
        assert "truncated" in decode_command(host.receive(timeout_s=5).payload)[1]["message"]
        assert host.send_command("reset") and decode_command(host.receive(timeout_s=5).payload)[0] == "ok"


def test_send_gives_up_without_peer_and_never_raises(pty_pair) -> None:
    _, path = pty_pair  # nobody answers on the device end
    link = Link(path, ack_timeout_s=0.01, max_retries=3, send_timeout_s=2)
    with link:
        assert link.send(FrameType.DATA, b"hello") is False
    assert link.stats.sent == 4 and link.stats.retransmissions == 3 and link.stats.send_failures == 1


def test_loop_url_link_hears_itself_once() -> None:
    port = serial.serial_for_url("loop://", timeout=0.01)  # a loopback: the link acks its own frames
    with Link(lambda: port, ack_timeout_s=0.05) as link:
        assert link.send(FrameType.DATA, b"hello")
        frame = link.receive(timeout_s=1)
    assert frame.payload == b"hello" and link.stats.delivered == 1 and link.stats.duplicates == 0


def test_duplicate_is_acked_but_delivered_once() -> None:
    port = serial.serial_for_url("loop://", timeout=0.01)
    link = Link(lambda: port, ack_timeout_s=0.01)
    wire = encode_frame(Frame(FrameType.DATA, 42, b"x"))
    with link:
        port.write(wire + wire + b"\x00\x13garbage\x00" + wire)
        first = link.receive(timeout_s=1)
        time.sleep(0.1)
        assert first.payload == b"x" and link.receive(timeout_s=0.05) is None
    assert link.stats.duplicates == 2 and link.dropped()["cobs"] + link.dropped()["short"] == 1


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    """Poll ``condition`` until it holds (generous: the reader thread may be starved on a loaded CI)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_manual_ack_is_sent_only_after_acknowledge() -> None:
    port = serial.serial_for_url("loop://", timeout=0.01)  # a loopback: our ACKs come back as stale ACKs
    link = Link(lambda: port, auto_ack=False)
    wire = encode_frame(Frame(FrameType.DATA, 7, b"x"))
    with link:
        port.write(wire)
        frame = link.receive(timeout_s=30)
        assert frame is not None and frame.payload == b"x"
        port.write(wire)  # a retransmission while the frame is being processed: neither delivered nor acked
        assert wait_until(lambda: link.stats.duplicates == 1)
        assert link.stats.acks_sent == 0 and link.receive(timeout_s=0.05) is None
        link.acknowledge(frame)
        assert link.stats.acks_sent == 1
        link.acknowledge(frame)  # already acknowledged: ignored
        port.write(wire)  # the ACK was lost: acknowledged again, not delivered again
        assert wait_until(lambda: link.stats.acks_sent == 2)
        assert link.receive(timeout_s=0.05) is None
    assert link.stats.delivered == 1 and link.stats.duplicates == 2


def test_acknowledge_needs_manual_ack_link() -> None:
    link = Link(lambda: serial.serial_for_url("loop://"))
    with pytest.raises(ValueError, match="auto_ack=False"):
        link.acknowledge(Frame(FrameType.DATA, 1))
    link.close()


def one_hot(i: int, n: int) -> dict[str, torch.Tensor]:
    """A delta that adds 1 to entry ``i`` only: the sum of what a device applied shows each frame's count."""
    delta = torch.zeros(n)
    delta[i] = 1.0
    return {"w": delta}


def replug_link(path: Path) -> Link:
    return Link(
        str(path),
        ack_timeout_s=0.5,  # generous: a loaded CI machine must not turn this into a retransmission test
        max_retries=100,
        send_timeout_s=120,
        backoff=Backoff(initial_s=0.01, max_s=0.2),
        name="host",
    )


@pytest.mark.integration
def test_unplug_mid_stream_delivers_exactly_once(socket_path) -> None:
    n = 20
    host = replug_link(socket_path.path)
    first = DeviceEmulator(socket_path.plug(), parameters={"w": torch.zeros(n)}).start()
    replugged: list[DeviceEmulator] = []

    def replug() -> None:
        time.sleep(0.4)
        replugged.append(DeviceEmulator(socket_path.plug(), parameters={"w": torch.zeros(n)}).start())

    with host:
        before = [host.send_tensors(one_hot(i, n)) for i in range(n)]
        first.close()  # the device goes away mid-stream, right after acknowledging frame n - 1
        socket_path.unplug()
        replugger = threading.Thread(target=replug)
        replugger.start()
        after = [host.send_tensors(one_hot(i, n)) for i in range(n)]  # the first waits for the replug
        replugger.join()
    (second,) = replugged
    second.close()
    assert all(before) and all(after)
    # >= 1: a write racing the reader's reconnect can make the port reconnect once more (devices.ports)
    assert host.stats.reconnects >= 1 and host.port.failures >= 1 and host.stats.send_failures == 0
    for device in (first, second):  # every acknowledged frame applied exactly once: a 0 or a 2 would show
        assert torch.equal(device.parameters["w"], torch.ones(n))
        assert device.applied == n and device.link.stats.delivered == n


@pytest.mark.integration
def test_frame_received_but_not_applied_goes_to_the_replugged_device(socket_path) -> None:
    host = replug_link(socket_path.path)
    device_port = socket_path.plug()
    stalled = Link(ReconnectingPort(lambda: device_port, backoff=Backoff(max_attempts=1)), auto_ack=False)
    results: list[bool] = []
    with host, stalled:
        sender = threading.Thread(target=lambda: results.append(host.send_tensors({"w": torch.ones(1)})))
        sender.start()
        assert stalled.receive(timeout_s=30) is not None  # received, never applied nor acknowledged
        stalled.close()
        socket_path.unplug()
        with DeviceEmulator(socket_path.plug(), parameters={"w": torch.zeros(1)}) as device:
            sender.join()
            assert results == [True]
            assert float(device.parameters["w"]) == 1.0 and device.applied == 1
    assert stalled.stats.delivered == 1 and stalled.stats.acks_sent == 0 and host.stats.reconnects >= 1


def test_oversized_payload_is_a_clear_error() -> None:
    link = Link(lambda: serial.serial_for_url("loop://"), max_payload_bytes=16)
    with pytest.raises(ValueError, match="max_payload_bytes=16"):
        link.send(FrameType.DATA, b"x" * 17)
    link.close()


def test_pty_port_reads_after_close_raise_oserror() -> None:
    from devices.ports import open_pty

    port, _ = open_pty()
    assert isinstance(port, PtyPort)
    port.close()
    with pytest.raises(OSError):
        port.read(1)
