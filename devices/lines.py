"""Sensor samples from a serial line, in the Edge Impulse data forwarder convention, windowed for a model.

One reading per line, values separated by commas, tabs or spaces (``"0.12,-9.81,0.40"``), optionally a
label in one column (``label_column``). :func:`parse_line` is the pure parser; :class:`SampleStream`
reads lines from a :class:`devices.ports.ReconnectingPort` (partial lines across read timeouts are
reassembled), skips and counts what it cannot use (undecodable bytes, non-numeric fields, a changed
column count, over-long lines), estimates the sampling rate by counting lines per second, and never
raises into its consumer. :class:`Windower` / :func:`windows` cut samples into ``(x, y)`` tensors shaped
``(1, channels, window)`` and ``(1,)`` for a 1-D CNN.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from devices.ports import Backoff, PortLike, ReconnectingPort
from ondevice.errors import ConfigError, OnDeviceError

if TYPE_CHECKING:
    import torch

__all__ = [
    "LineError",
    "Sample",
    "SampleStream",
    "StreamStats",
    "Windower",
    "parse_line",
    "windows",
]

logger = logging.getLogger(__name__)

_SEPARATORS = re.compile(r"[,\t ]+")
DROP_REASONS = ("column_count", "empty", "non_numeric", "overflow", "overlong", "resync", "undecodable")


class LineError(OnDeviceError, ValueError):
    """A line that is not a reading; ``reason`` is one of ``non_numeric``, ``column_count``, ``empty``."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class Sample:
    """One reading: channel values, an optional label, and when its line completed (monotonic seconds)."""

    values: tuple[float, ...]
    label: str | None = None
    t_s: float = 0.0


def parse_line(text: str, *, label_column: int | None = None, t_s: float = 0.0) -> Sample:
    """Parse one forwarder line such as ``"0.1, -9.8\t0.4"`` (with the label at ``label_column``).

    Raises :class:`LineError` for an empty line, a non-numeric value or a missing label column.
    """
    stripped = text.strip().strip(",")
    if not stripped:
        raise LineError("empty", "empty line")
    fields = _SEPARATORS.split(stripped)
    label: str | None = None
    if label_column is not None:
        index = label_column if label_column >= 0 else len(fields) + label_column
        if not 0 <= index < len(fields) or len(fields) < 2:
            raise LineError("column_count", f"no label column {label_column} in {len(fields)} field(s)")
        label = fields.pop(index)
    try:
        values = tuple(float(f) for f in fields)
    except ValueError:
        raise LineError("non_numeric", f"non-numeric value in {text.strip()[:60]!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise LineError("non_numeric", f"non-finite value in {text.strip()[:60]!r}")
    return Sample(values=values, label=label, t_s=t_s)


@dataclass
class StreamStats:
    """What a :class:`SampleStream` read and what it dropped, by reason."""

    lines: int = 0
    samples: int = 0
    partial_reads: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    sampling_rate_hz: float | None = None
    channels: int | None = None

    @property
    def dropped_total(self) -> int:
        """All dropped lines."""
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return {
            "lines": self.lines,
            "samples": self.samples,
            "partial_reads": self.partial_reads,
            "dropped": dict(self.dropped),
            "dropped_total": self.dropped_total,
            "reconnects": self.reconnects,
            "sampling_rate_hz": self.sampling_rate_hz,
            "channels": self.channels,
        }


class SampleStream:
    """Readings from a serial port or pyserial URL, one per line; iterate it or call :meth:`samples`.

    Args:
        port: a pyserial URL or path (``"/dev/ttyACM0"``, ``"loop://"``), a callable that opens a
            port, or a ready :class:`~devices.ports.ReconnectingPort`.
        label_column: index of a label column (negative counts from the end), or ``None``.
        baudrate: line speed (115200, the forwarder's default).
        read_timeout_s: how long one read waits; a line split across reads is reassembled.
        backoff: reconnection policy after an unplug.
        max_line_bytes: longer lines (garbage without newlines) are dropped as ``overlong``.
        adopt_after: a new column count seen on this many consecutive lines becomes the expected one
            (the sensor was reconfigured); until then such lines are dropped as ``column_count``.
        rate_window: lines used to estimate the sampling rate.
        resync: discard the bytes up to the first newline after each (re)open, counted as ``resync``:
            opening a port in the middle of a line would otherwise yield a cut reading. Turn it off only
            when the device starts writing after the port is open.
        clock: monotonic clock for timestamps (injectable for tests).
        queue_size: ``None`` reads in the consumer's thread, between the samples it takes (a consumer
            that learns between reads leaves the sensor's bytes in the OS buffer, which a fast sensor
            overruns). A positive number reads in a thread of its own, started by the first
            :meth:`samples` (or :meth:`start`), which parses readings into a queue of at most this many;
            when the consumer falls that far behind, the oldest queued reading is dropped and counted as
            ``overflow`` in ``stats.dropped`` (with a warning at the 1st, 10th, 100th... one), so the
            consumer always resumes at the freshest readings. Each reading keeps the time its line
            arrived (``t_s``), and ``stats`` is updated by the reader thread as lines arrive.
    """

    def __init__(
        self,
        port: str | Callable[[], PortLike] | ReconnectingPort,
        *,
        label_column: int | None = None,
        baudrate: int = 115200,
        read_timeout_s: float = 0.05,
        backoff: Backoff | None = None,
        max_line_bytes: int = 1024,
        adopt_after: int = 50,
        rate_window: int = 200,
        resync: bool = True,
        clock: Callable[[], float] = time.monotonic,
        queue_size: int | None = None,
    ) -> None:
        if max_line_bytes < 8 or adopt_after < 1 or rate_window < 2:
            raise ConfigError("SampleStream needs max_line_bytes >= 8, adopt_after >= 1 and rate_window >= 2")
        if queue_size is not None and (isinstance(queue_size, bool) or queue_size < 1):
            raise ConfigError(
                f"SampleStream queue_size must be None (read inline) or a positive number of readings, "
                f"got {queue_size!r}"
            )
        self.queue_size = queue_size
        self._queue: deque[Sample] = deque()
        self._ready = threading.Condition()
        self._reader: threading.Thread | None = None
        self._reader_done = False
        self.port = (
            port
            if isinstance(port, ReconnectingPort)
            else ReconnectingPort(port, backoff=backoff, baudrate=baudrate, read_timeout_s=read_timeout_s)
        )
        self.label_column = label_column
        self.max_line_bytes = max_line_bytes
        self.adopt_after = adopt_after
        self.stats = StreamStats()
        self._clock = clock
        self._buffer = bytearray()
        self._skipping = False
        self._resync = resync
        self._resync_pending = resync
        self._times: deque[float] = deque(maxlen=rate_window)
        self._candidate: tuple[int, int] | None = None  # (column count, consecutive lines)

    def _drop(self, reason: str, detail: str = "") -> None:
        self.stats.dropped[reason] += 1
        logger.debug("dropped line (%s) %s", reason, detail)

    def _accept(self, raw: bytes, now: float) -> Sample | None:
        self.stats.lines += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._drop("undecodable", repr(raw[:40]))
            return None
        try:
            sample = parse_line(text, label_column=self.label_column, t_s=now)
        except LineError as error:
            self._drop(error.reason, str(error))
            return None
        channels = len(sample.values)
        if self.stats.channels is None:
            self.stats.channels = channels
        elif channels != self.stats.channels:
            count = self._candidate[1] + 1 if self._candidate and self._candidate[0] == channels else 1
            self._candidate = (channels, count)
            if count < self.adopt_after:
                self._drop("column_count", f"{channels} values, expected {self.stats.channels}")
                return None
            logger.warning("the sensor now sends %d values per line (was %d)", channels, self.stats.channels)
            self.stats.channels = channels
        self._candidate = None
        self._times.append(now)
        if len(self._times) >= 2 and self._times[-1] > self._times[0]:
            self.stats.sampling_rate_hz = (len(self._times) - 1) / (self._times[-1] - self._times[0])
        self.stats.samples += 1
        return sample

    def _feed(self, chunk: bytes, now: float) -> list[Sample]:
        samples: list[Sample] = []
        self._buffer += chunk
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                break
            raw = bytes(self._buffer[:newline]).rstrip(b"\r")
            del self._buffer[: newline + 1]
            if self._skipping:  # tail of an over-long line
                self._skipping = False
                continue
            if self._resync_pending:  # the first line after opening may be cut
                self._resync_pending = False
                self.stats.lines += 1
                self._drop("resync", repr(raw[:40]))
                continue
            if len(raw) > self.max_line_bytes:
                self.stats.lines += 1
                self._drop("overlong", f"{len(raw)} bytes")
                continue
            sample = self._accept(raw, now)
            if sample is not None:
                samples.append(sample)
        if len(self._buffer) > self.max_line_bytes:
            self.stats.lines += 1
            self._drop("overlong", f"{len(self._buffer)} bytes without a newline")
            self._buffer.clear()
            self._skipping = True
        elif self._buffer:
            self.stats.partial_reads += 1
        return samples

    def _read_chunk(self) -> list[Sample] | None:
        """One read from the port, parsed; ``None`` once the port is closed or backoff gave up."""
        reconnects = self.port.reconnects
        chunk = self.port.read(4096)
        if self.port.reconnects != reconnects:
            self._buffer.clear()  # a line cut by the unplug is not a reading
            self._skipping = False
            self._resync_pending = self._resync
        self.stats.reconnects = self.port.reconnects
        if not chunk:
            return None if self.port.gave_up or self.port.closed else []
        return self._feed(chunk, self._clock())

    def start(self) -> SampleStream:
        """Start the reader thread (with ``queue_size``; idempotent, and a no-op when reading inline)."""
        if self.queue_size is not None and self._reader is None:
            self._reader = threading.Thread(target=self._read_loop, name="sample-stream-reader", daemon=True)
            self._reader.start()
        return self

    def _read_loop(self) -> None:
        assert self.queue_size is not None
        try:
            while not self.port.closed:
                try:
                    samples = self._read_chunk()
                except Exception:  # never let the reader die on a bad line
                    logger.exception("unexpected error in the serial reader; continuing")
                    continue
                if samples is None:
                    return
                if not samples:
                    continue
                with self._ready:
                    for sample in samples:
                        if len(self._queue) >= self.queue_size:
                            self._queue.popleft()
                            self._drop("overflow", "the consumer fell behind")
                            overflow = self.stats.dropped["overflow"]
                            if overflow == 10 ** int(math.log10(overflow)):
                                logger.warning(
                                    "%d reading(s) dropped so far: the consumer is slower than the sensor "
                                    "(queue of %d full); the oldest queued readings go first",
                                    overflow,
                                    self.queue_size,
                                )
                        self._queue.append(sample)
                    self._ready.notify_all()
        finally:
            with self._ready:
                self._reader_done = True
                self._ready.notify_all()

    def _queued(self, deadline: float | None) -> Iterator[Sample]:
        self.start()
        while not self.port.closed:
            with self._ready:
                if not self._queue:
                    if self._reader_done:
                        return
                    self._ready.wait(0.05)
                batch = list(self._queue)
                self._queue.clear()
            yield from batch
            if deadline is not None and self._clock() >= deadline:
                return

    def samples(self, *, max_samples: int | None = None, duration_s: float | None = None) -> Iterator[Sample]:
        """Yield readings until ``max_samples``, ``duration_s``, :meth:`close`, or backoff gives up."""
        deadline = None if duration_s is None else self._clock() + duration_s
        produced = 0
        if max_samples is not None and max_samples <= 0:
            return
        if self.queue_size is not None:
            for sample in self._queued(deadline):
                yield sample
                produced += 1
                if max_samples is not None and produced >= max_samples:
                    return
            return
        while not self.port.closed:
            if deadline is not None and self._clock() >= deadline:
                return
            chunk = self._read_chunk()
            if chunk is None:
                return
            for sample in chunk:
                yield sample
                produced += 1
                if max_samples is not None and produced >= max_samples:
                    return

    def __iter__(self) -> Iterator[Sample]:
        return self.samples()

    def close(self) -> None:
        """Close the port; an iterating consumer stops within one read timeout (and the reader thread)."""
        self.port.close()
        with self._ready:
            self._ready.notify_all()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)

    def __enter__(self) -> SampleStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Windower:
    """Cut a sample stream into overlapping windows: ``window`` samples long, a new one every ``hop``.

    ``push`` returns the ``(x, y)`` pairs a sample completes: ``x`` is float32 ``(1, channels, window)``
    (channels first, as ``torch.nn.Conv1d`` wants), ``y`` is int64 ``(1,)``: the most common label in
    the window (ties go to the latest), mapped through ``labels`` (or numbered in order of appearance;
    unlabelled windows get ``-1``). A change in channel count restarts the window.
    """

    def __init__(self, window: int, hop: int | None = None, *, labels: Sequence[str] | None = None) -> None:
        hop = window if hop is None else hop
        if window < 1 or not hop >= 1:
            raise ConfigError(f"Windower needs window >= 1 and hop >= 1, got window={window}, hop={hop}")
        self.window = window
        self.hop = hop
        self.label_index: dict[str, int] = {name: i for i, name in enumerate(labels or ())}
        self._fixed_labels = labels is not None
        self._buffer: deque[Sample] = deque(maxlen=window)
        self._since_last = 0
        self._started = False
        self.unknown_labels = 0

    def _label_id(self) -> int:
        names = [s.label for s in self._buffer if s.label is not None]
        if not names:
            return -1
        counts = Counter(names)
        best = max(counts.values())
        name = next(n for n in reversed(names) if counts[n] == best)
        if name not in self.label_index:
            if self._fixed_labels:
                self.unknown_labels += 1
                return -1
            self.label_index[name] = len(self.label_index)
        return self.label_index[name]

    def push(self, sample: Sample) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Add one sample; return the windows it completes (zero or one)."""
        import torch

        if self._buffer and len(self._buffer[0].values) != len(sample.values):
            self._buffer.clear()
            self._since_last = 0
            self._started = False
        self._buffer.append(sample)
        self._since_last += 1
        if len(self._buffer) < self.window:
            return []
        if self._started and self._since_last < self.hop:
            return []
        self._started = True
        self._since_last = 0
        x = torch.tensor([s.values for s in self._buffer], dtype=torch.float32).T.unsqueeze(0)
        y = torch.tensor([self._label_id()], dtype=torch.int64)
        return [(x.contiguous(), y)]


def windows(
    samples: Iterable[Sample], window: int, hop: int | None = None, *, labels: Sequence[str] | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windows of ``samples`` (see :class:`Windower`), lazily."""
    windower = Windower(window, hop, labels=labels)
    for sample in samples:
        yield from windower.push(sample)
