"""A reliable framed link over a serial line: sequence numbers, acknowledgements, retries, reconnects.

Stop-and-wait ARQ over :mod:`devices.framing`: every non-ACK frame carries a 32-bit sequence number and
is acknowledged by an ACK frame with the same number. The sender retransmits after ``ack_timeout_s``, up
to ``max_retries`` times; the receiver delivers a sequence number only once (it remembers the last
``dedup_window`` numbers), so a retransmission whose ACK was lost is acknowledged again but not
delivered twice. Each link starts from a random sequence number, so a device that rebooted is not
mistaken for a duplicate. While the port is unplugged the reader thread reopens it with exponential
backoff (:class:`devices.ports.ReconnectingPort`) and ``send`` keeps the frame pending until
``send_timeout_s``. Nothing here raises into the caller on a bad line: ``send`` returns ``False`` and
``stats`` counts what was dropped and why.

What an ACK means depends on the receiver's ``auto_ack``:

- ``auto_ack=True`` (the default, right for a host reading replies): the frame is acknowledged as soon
  as it is queued for :meth:`Link.receive`. The ACK says "received", not "processed": a frame still in
  the inbox when the receiver stops is lost although its sender saw ``True``.
- ``auto_ack=False`` (what a device applying parameter deltas needs, see :mod:`devices.testing.emulator`): the
  application calls :meth:`Link.acknowledge` once it has *applied* the frame. Until then a
  retransmission of that frame is counted as a duplicate and neither delivered again nor acknowledged,
  and a frame the receiver never acknowledged (it was closed or unplugged first) is retransmitted by
  the sender, to the replugged device.

Guarantees across an unplug/replug, with ``auto_ack=False`` on the receiving side: every frame for
which ``send`` returned ``True`` was applied exactly once by the receiver whose ACK the sender read;
no receiver applies a sequence number twice. The sender's sequence numbers continue across a
reconnect, so a receiver that merely lost its cable (and kept its state) re-acknowledges a
retransmission of a frame it already applied; a receiver that rebooted starts with no history, so it
applies what it is sent. ACKs cannot be confused across the replug: the sender waits only for the
sequence number of the one frame in flight (any other ACK is counted as ``stale_acks``) and never
reuses a number within a link, and the decoder drops a partial segment left from the old port. A
frame in flight at the moment of the unplug may have been applied by the old receiver as well (its
ACK was lost with the cable): no protocol can tell the sender, and the rebooted device lost that
state anyway.
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
    """One end of a framed, acknowledged serial link (the host's, or a device's: ``devices.testing``).

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
        auto_ack: acknowledge a frame as soon as it is queued for :meth:`receive` (``True``), or only
            when the application calls :meth:`acknowledge` after processing it (``False``; exactly-once
            processing, see the module docstring).
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
        auto_ack: bool = True,
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
        self.auto_ack = auto_ack
        self._inbox: queue.Queue[Frame] = queue.Queue(maxsize=inbox_size)
        self._seen: OrderedDict[int, None] = OrderedDict()
        self._dedup_window = dedup_window
        self._unacked: set[int] = set()  # delivered, waiting for acknowledge() (auto_ack=False)
        self._rx_lock = threading.Lock()  # _seen and _unacked: the reader and acknowledge() share them
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
        """The next delivered frame (never an ACK or a duplicate), or ``None`` after ``timeout_s``.

        With ``auto_ack=False`` pass the frame to :meth:`acknowledge` once it has been processed.
        """
        try:
            return self._inbox.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def acknowledge(self, frame: Frame) -> None:
        """Acknowledge ``frame`` (from :meth:`receive`) after processing it; only with ``auto_ack=False``.

        Call it once the frame's effect is applied: the sender's ``send`` returns ``True`` on this ACK.
        If the ACK is lost (or the port is down), the sender's retransmission is acknowledged again
        without being delivered. A frame that is not awaiting its ACK (already acknowledged) is ignored.
        """
        if self.auto_ack:
            raise ConfigError(
                f"{self.name}: this link acknowledges frames on receipt (auto_ack=True); create it with "
                "auto_ack=False to acknowledge each frame after processing it"
            )
        with self._rx_lock:
            if frame.seq not in self._unacked:
                logger.debug("%s: frame %d is not awaiting an ACK; ignored", self.name, frame.seq)
                return
            self._unacked.discard(frame.seq)  # before writing: a retransmission is now re-acknowledged
        self._ack(frame.seq)

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
        with self._rx_lock:
            if frame.seq in self._unacked:  # still being processed: acknowledge() sends its ACK
                self.stats.duplicates += 1
                return
            duplicate = frame.seq in self._seen  # delivered and acknowledged, but the ACK was lost
            if duplicate:
                self.stats.duplicates += 1
            elif not self._deliver(frame):
                return
        if duplicate or self.auto_ack:
            self._ack(frame.seq)

    def _deliver(self, frame: Frame) -> bool:
        """Queue a new frame for :meth:`receive` (the caller holds ``_rx_lock``); ``False`` if full."""
        if not self.auto_ack:
            self._unacked.add(frame.seq)  # before the application can take it from the inbox
        try:
            self._inbox.put_nowait(frame)
        except queue.Full:
            self._unacked.discard(frame.seq)
            self.stats.dropped["inbox_full"] += 1  # not acknowledged: the peer will retransmit
            return False
        self._seen[frame.seq] = None
        if len(self._seen) > self._dedup_window:
            self._seen.popitem(last=False)
        self.stats.delivered += 1
        return True

    def _ack(self, seq: int) -> None:
        if self.port.write(encode_frame(Frame(FrameType.ACK, seq))):
            self.stats.acks_sent += 1

    def dropped(self) -> Counter[str]:
        """Everything dropped so far: bad segments (decoder) and frames the link refused."""
        merged = Counter(self.decoder.stats.dropped)
        merged.update(self.stats.dropped)
        return merged

    def drain(self) -> list[Frame]:
        """All frames waiting in the inbox, without blocking (with ``auto_ack=False``, acknowledge them)."""
        frames: list[Frame] = []
        with contextlib.suppress(queue.Empty):
            while True:
                frames.append(self._inbox.get_nowait())
        return frames
