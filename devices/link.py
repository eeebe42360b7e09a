"""A reliable framed link over a serial line: sequence numbers, acknowledgements, retries, reconnects.

Stop-and-wait ARQ over :mod:`devices.framing`: every non-ACK frame carries a 32-bit sequence number and
is acknowledged by an ACK frame with the same number. The sender retransmits after ``ack_timeout_s``, up
to ``max_retries`` times; the receiver acknowledges every copy but delivers a sequence number only once
(it remembers the last ``dedup_window`` numbers), so a retransmission whose ACK was lost is not
delivered twice. Each link starts from a random sequence number, so a device that rebooted is not
mistaken for a duplicate. While the port is unplugged the reader thread reopens it with exponential
backoff (:class:`devices.ports.ReconnectingPort`) and ``send`` keeps the frame pending until
``send_timeout_s``. Nothing here raises into the caller on a bad line: ``send`` returns ``False`` and
``stats`` counts what was dropped and why.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from devices.framing import DEFAULT_MAX_PAYLOAD_BYTES, Frame, FrameDecoder, FrameType, encode_frame
from devices.payloads import encode_command, encode_tensors
from devices.ports import Backoff, PortLike, ReconnectingPort
from ondevice.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["Link", "LinkStats"]

logger = logging.getLogger(__name__)


@dataclass
class LinkStats:
    """Counters of one :class:`Link` (``dropped`` merges the decoder's reasons with the link's own)."""

    sent: int = 0
    retransmissions: int = 0
    acked: int = 0
    send_failures: int = 0
    received: int = 0
    delivered: int = 0
    duplicates: int = 0
    acks_sent: int = 0
    stale_acks: int = 0
    reconnects: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    @property
    def dropped_total(self) -> int:
        """All dropped segments and frames."""
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        data = {k: v for k, v in self.__dict__.items() if k != "dropped"}
        data["dropped"] = dict(self.dropped)
        return data


class Link:
    """One end of a framed, acknowledged serial link (the host's, or a device's in :mod:`devices.emulator`).

    Args:
        port: a pyserial URL or path, a callable opening a port, or a :class:`ReconnectingPort`.
        ack_timeout_s: wait for an ACK before retransmitting.
        max_retries: retransmissions of one frame before ``send`` gives up (returns ``False``).
        send_timeout_s: overall limit for one ``send``, including waiting for an unplugged port.
        backoff: reconnection policy.
        max_payload_bytes: larger frames are rejected (counted as ``oversize``).
        inbox_size: received frames waiting for :meth:`receive`; when full, frames are not acknowledged,
            so the peer retransmits later (back-pressure instead of loss).
        dedup_window: how many recent sequence numbers the receiver remembers.
    """

    def __init__(
        self,
        port: str | Callable[[], PortLike] | ReconnectingPort,
        *,
        ack_timeout_s: float = 0.2,
        max_retries: int = 10,
        send_timeout_s: float = 10.0,
        backoff: Backoff | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        inbox_size: int = 1024,
        dedup_window: int = 1024,
        baudrate: int = 115200,
        name: str = "link",
    ) -> None:
        if ack_timeout_s <= 0 or max_retries < 0 or send_timeout_s <= 0 or dedup_window < 1:
            raise ConfigError(
                "Link needs ack_timeout_s > 0, max_retries >= 0, send_timeout_s > 0 and dedup_window >= 1"
            )
        self.port = (
            port
            if isinstance(port, ReconnectingPort)
            else ReconnectingPort(port, backoff=backoff, baudrate=baudrate)
        )
        self.ack_timeout_s = ack_timeout_s
        self.max_retries = max_retries
        self.send_timeout_s = send_timeout_s
        self.name = name
        self.stats = LinkStats()
        self.decoder = FrameDecoder(max_payload_bytes=max_payload_bytes)
        self.max_payload_bytes = max_payload_bytes
        self._inbox: queue.Queue[Frame] = queue.Queue(maxsize=inbox_size)
        self._seen: OrderedDict[int, None] = OrderedDict()
        self._dedup_window = dedup_window
        self._next_seq = random.SystemRandom().randrange(1 << 32)
        self._send_lock = threading.Lock()
        self._ack_cond = threading.Condition()
        self._acked_seq: int | None = None
        self._pending_seq: int | None = None
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> Link:
        """Start the reader thread (idempotent)."""
        if self._reader is None:
            self._reader = threading.Thread(target=self._read_loop, name=f"{self.name}-reader", daemon=True)
            self._reader.start()
        return self

    def close(self) -> None:
        """Stop the reader and close the port."""
        self._stop.set()
        self.port.close()
        with self._ack_cond:
            self._ack_cond.notify_all()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)

    def __enter__(self) -> Link:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sending -----------------------------------------------------------------------------------
    def send(self, frame_type: FrameType, payload: bytes = b"", *, flags: int = 0) -> bool:
        """Send one frame and wait for its ACK; ``True`` once acknowledged, ``False`` if it gave up."""
        if frame_type is FrameType.ACK:
            raise ConfigError("ACK frames are sent by the link itself; send DATA, TENSORS, COMMAND or REPLY")
        if len(payload) > self.max_payload_bytes:
            raise ConfigError(
                f"payload of {len(payload)} bytes exceeds max_payload_bytes={self.max_payload_bytes}; "
                "split it or raise the limit on both ends"
            )
        self.start()
        with self._send_lock:
            seq = self._next_seq
            self._next_seq = (seq + 1) & 0xFFFFFFFF
            wire = encode_frame(Frame(frame_type, seq, payload, flags))
            with self._ack_cond:
                self._pending_seq = seq
            deadline = time.monotonic() + self.send_timeout_s
            transmissions = 0
            try:
                while not self._stop.is_set() and time.monotonic() < deadline:
                    if self.port.write(wire):
                        transmissions += 1
                        self.stats.sent += 1
                        if transmissions > 1:
                            self.stats.retransmissions += 1
                    if self._wait_ack(seq, min(self.ack_timeout_s, max(0.0, deadline - time.monotonic()))):
                        self.stats.acked += 1
                        return True
                    if transmissions > self.max_retries:
                        break
            finally:
                with self._ack_cond:
                    self._pending_seq = None
            self.stats.send_failures += 1
            logger.warning(
                "%s: frame %d (%s) not acknowledged after %d transmission(s)",
                self.name,
                seq,
                frame_type.name,
                transmissions,
            )
            return False

    def send_tensors(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Send named tensors (e.g. a parameter delta) as one TENSORS frame."""
        return self.send(FrameType.TENSORS, encode_tensors(tensors))

    def send_command(self, op: str, args: Mapping[str, Any] | None = None) -> bool:
        """Send a COMMAND frame ``{"op": op, "args": args}``."""
        return self.send(FrameType.COMMAND, encode_command(op, args))

    def _wait_ack(self, seq: int, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        with self._ack_cond:
            while self._acked_seq != seq:
                left = end - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return False
                self._ack_cond.wait(left)
            return True

    # -- receiving ---------------------------------------------------------------------------------
    def receive(self, timeout_s: float | None = None) -> Frame | None:
        """The next delivered frame (never an ACK or a duplicate), or ``None`` after ``timeout_s``."""
        try:
            return self._inbox.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def _read_loop(self) -> None:
        reconnects = self.port.reconnects
        while not self._stop.is_set():
            try:
                chunk = self.port.read(65536)
                if self.port.reconnects != reconnects:
                    reconnects = self.port.reconnects
                    self.stats.reconnects = reconnects
                    self.decoder.reset()
                if not chunk:
                    if self.port.gave_up:
                        return
                    continue
                for frame in self.decoder.feed(chunk):
                    self._handle(frame)
            except Exception:  # never let the reader die on a bad line
                logger.exception("%s: unexpected error in the reader; continuing", self.name)
                self.stats.dropped["internal"] += 1

    def _handle(self, frame: Frame) -> None:
        if frame.type is FrameType.ACK:
            with self._ack_cond:
                if frame.seq == self._pending_seq:
                    self._acked_seq = frame.seq
                    self._ack_cond.notify_all()
                else:
                    self.stats.stale_acks += 1
            return
        self.stats.received += 1
        if frame.seq in self._seen:
            self.stats.duplicates += 1
            self._ack(frame.seq)
            return
        try:
            self._inbox.put_nowait(frame)
        except queue.Full:
            self.stats.dropped["inbox_full"] += 1  # not acknowledged: the peer will retransmit
            return
        self._seen[frame.seq] = None
        if len(self._seen) > self._dedup_window:
            self._seen.popitem(last=False)
        self.stats.delivered += 1
        self._ack(frame.seq)

    def _ack(self, seq: int) -> None:
        if self.port.write(encode_frame(Frame(FrameType.ACK, seq))):
            self.stats.acks_sent += 1

    def dropped(self) -> Counter[str]:
        """Everything dropped so far: bad segments (decoder) and frames the link refused."""
        merged = Counter(self.decoder.stats.dropped)
        merged.update(self.stats.dropped)
        return merged

    def drain(self) -> list[Frame]:
        """All frames waiting in the inbox, without blocking."""
        frames: list[Frame] = []
        with contextlib.suppress(queue.Empty):
            while True:
                frames.append(self._inbox.get_nowait())
        return frames
