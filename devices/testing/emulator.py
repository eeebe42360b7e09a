"""A device in Python: the microcontroller side of the line and frame protocols, for tests and examples.

:class:`SensorEmulator` writes readings in the Edge Impulse data forwarder format at a given rate (with
optional garbage, partial writes and a label column), like an Arduino sketch printing ``Serial.println``.
:class:`DeviceEmulator` speaks the framed link of :mod:`devices.link`: it keeps named parameter tensors,
adds the TENSORS deltas it receives, and answers COMMAND frames:

- ``ping`` -> REPLY ``{"op": "pong", "args": {"seq": n}}``
- ``get`` -> a TENSORS frame with the current parameters
- ``reset`` -> zeroes the parameters, REPLY ``{"op": "ok"}``
- ``stats`` -> REPLY with the link's counters

Its link runs with ``auto_ack=False``: a frame is acknowledged only after the emulator has applied it
(a delta added, a command executed or a bad payload rejected), and before any reply is sent. So when the
host's ``send`` returns ``True`` the delta is in :attr:`DeviceEmulator.parameters`, and a frame still
queued when the device is closed or unplugged is not acknowledged: the host retransmits it to the
replugged device instead of losing it.

Both run over any pyserial URL, a callable opening a port, or the master end of a pty
(:func:`devices.ports.open_pty`), in a background thread; ``close()`` stops them.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from devices.framing import Frame, FrameType
from devices.link import Link
from devices.payloads import PayloadError, decode_command, decode_tensors, encode_command, encode_tensors
from devices.ports import Backoff, PortLike, ReconnectingPort

if TYPE_CHECKING:
    import torch

__all__ = ["DeviceEmulator", "SensorEmulator", "sensor_lines"]

logger = logging.getLogger(__name__)


def sensor_lines(
    n: int,
    *,
    channels: int = 3,
    classes: Sequence[str] = ("idle", "wave"),
    segment: int = 64,
    separator: str = ",",
    label_column: int | None = None,
    seed: int = 0,
) -> list[str]:
    """``n`` forwarder lines of a synthetic accelerometer: each class a distinct waveform, ``segment`` long.

    Class ``k`` is a sine of frequency ``k + 1`` cycles per 32 samples and amplitude ``1 + k`` on every
    channel (phase-shifted per channel), plus small seeded noise; values are written with ``repr`` so
    they parse back to exactly the same floats. With ``label_column`` the class name is put there.
    """
    rng = random.Random(seed)
    lines: list[str] = []
    for i in range(n):
        k = (i // segment) % len(classes)
        values = [
            (1 + k) * math.sin(2 * math.pi * (k + 1) * i / 32 + c) + rng.gauss(0.0, 0.05)
            for c in range(channels)
        ]
        fields = [repr(round(v, 6)) for v in values]
        if label_column is not None:
            index = label_column if label_column >= 0 else len(fields) + 1 + label_column
            fields.insert(index, classes[k])
        lines.append(separator.join(fields))
    return lines


def _as_port(
    port: str | Callable[[], PortLike] | PortLike | ReconnectingPort, backoff: Backoff | None
) -> ReconnectingPort:
    if isinstance(port, ReconnectingPort):
        return port
    if isinstance(port, str) or (callable(port) and not hasattr(port, "read")):
        return ReconnectingPort(port, backoff=backoff)  # type: ignore[arg-type]
    opened: list[PortLike] = []

    def open_once() -> PortLike:  # a ready port (a pty master) cannot be reopened once it is gone
        if opened:
            raise OSError("the port was closed and cannot be reopened")
        opened.append(port)  # type: ignore[arg-type]
        return port  # type: ignore[return-value]

    return ReconnectingPort(open_once, backoff=backoff or Backoff(max_attempts=1))


class SensorEmulator:
    """Write forwarder lines to a port at ``rate_hz`` in a background thread.

    ``garbage_every=k`` inserts a line of undecodable bytes after every k-th line; ``split_writes``
    writes each line in two pieces with a pause, so the reader sees partial lines.
    """

    def __init__(
        self,
        port: str | Callable[[], PortLike] | PortLike | ReconnectingPort,
        lines: Iterable[str],
        *,
        rate_hz: float = 0.0,
        garbage_every: int = 0,
        split_writes: bool = False,
        backoff: Backoff | None = None,
    ) -> None:
        self.port = _as_port(port, backoff)
        self.lines = list(lines)
        self.rate_hz = rate_hz
        self.garbage_every = garbage_every
        self.split_writes = split_writes
        self.written = 0
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sensor-emulator", daemon=True)

    def start(self) -> SensorEmulator:
        """Start writing."""
        self.port.ensure_open()
        self._thread.start()
        return self

    def _run(self) -> None:
        period = 1.0 / self.rate_hz if self.rate_hz > 0 else 0.0
        start = time.monotonic()
        try:
            for i, line in enumerate(self.lines):
                if self._stop.is_set():
                    return
                data = (line + "\n").encode("utf-8")
                if self.split_writes:
                    half = len(data) // 2
                    self.port.write(data[:half])
                    time.sleep(0.002)
                    self.port.write(data[half:])
                else:
                    self.port.write(data)
                self.written += 1
                if self.garbage_every and (i + 1) % self.garbage_every == 0:
                    self.port.write(b"\xff\xfe\x80garbage\x81\n")
                if period:
                    delay = start + (i + 1) * period - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
        finally:
            self.done.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until every line was written."""
        return self.done.wait(timeout_s)

    def close(self) -> None:
        """Stop writing and close the port."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.port.close()

    def __enter__(self) -> SensorEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class DeviceEmulator:
    """The device end of the framed link: applies parameter deltas and answers commands."""

    def __init__(
        self,
        port: str | Callable[[], PortLike] | PortLike | ReconnectingPort,
        *,
        parameters: Mapping[str, torch.Tensor] | None = None,
        ack_timeout_s: float = 0.2,
        backoff: Backoff | None = None,
        **link_options: Any,
    ) -> None:
        line = _as_port(port, backoff)  # auto_ack=False: acknowledge what was applied (module docstring)
        self.link = Link(line, ack_timeout_s=ack_timeout_s, name="device", auto_ack=False, **link_options)
        self.parameters: dict[str, torch.Tensor] = {
            k: v.detach().clone() for k, v in (parameters or {}).items()
        }
        self.applied = 0
        self.rejected = 0
        self.commands = 0
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._serve, name="device-emulator", daemon=True)

    def start(self) -> DeviceEmulator:
        """Start the link and the command worker."""
        self.link.start()
        self._worker.start()
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            frame = self.link.receive(timeout_s=0.05)
            if frame is None:
                continue
            try:
                reply = self._process(frame)
            except PayloadError as error:
                self.rejected += 1
                logger.warning("device rejected frame %d: %s", frame.seq, error)
                reply = (FrameType.REPLY, encode_command("error", {"message": str(error)}))
            self.link.acknowledge(frame)  # applied (or rejected): now the host may count it delivered
            if reply is not None:
                self.link.send(*reply)

    def _process(self, frame: Frame) -> tuple[FrameType, bytes] | None:
        """Apply ``frame`` to the device state; the reply to send once it is acknowledged, if any."""
        if frame.type is FrameType.TENSORS:
            self._apply(decode_tensors(frame.payload))
            return None
        if frame.type is FrameType.COMMAND:
            self.commands += 1
            op, args = decode_command(frame.payload)
            return self._command(op, args)
        logger.debug("device ignores %s frame %d", frame.type.name, frame.seq)
        return None

    def _apply(self, delta: Mapping[str, torch.Tensor]) -> None:
        for name, value in delta.items():
            current = self.parameters.get(name)
            if current is None:
                self.parameters[name] = value.clone()
            elif current.shape != value.shape:
                raise PayloadError(
                    f"delta for {name!r} has shape {tuple(value.shape)}, the device holds "
                    f"{tuple(current.shape)}"
                )
            else:
                current.add_(value.to(current.dtype))
        self.applied += 1

    def _command(self, op: str, args: Mapping[str, Any]) -> tuple[FrameType, bytes]:
        if op == "ping":
            return FrameType.REPLY, encode_command("pong", {"seq": args.get("seq")})
        if op == "get":
            return FrameType.TENSORS, encode_tensors(self.parameters)
        if op == "reset":
            for value in self.parameters.values():
                value.zero_()
            return FrameType.REPLY, encode_command("ok")
        if op == "stats":
            stats = {"applied": self.applied, "rejected": self.rejected, **self.link.stats.to_dict()}
            return FrameType.REPLY, encode_command("stats", stats)
        raise PayloadError(f"unknown command {op!r}; the emulator knows get, ping, reset, stats")

    def close(self) -> None:
        """Stop serving and close the link (to the host: the device was unplugged)."""
        self._stop.set()
        if self._worker.is_alive():
            self._worker.join(timeout=5)
        self.link.close()

    def __enter__(self) -> DeviceEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
