"""A serial learning session: a live sensor's readings, cut into windows, learned as they arrive.

    session = SerialSession(SessionConfig("/dev/ttyACM0", window=32, labels=("idle", "wave")), make_learner)
    summary = session.run()          # until max_samples, duration_s, a lasting unplug or Ctrl-C
    print(summary.to_dict())

The session opens the port (a bad one fails at once, with what to do), reads Edge Impulse forwarder lines
through a :class:`~devices.lines.SampleStream` in a thread of its own, reopens the port after an unplug,
cuts the readings into windows (:class:`~devices.lines.Windower`) and builds the learner at the first
labelled window, for the channel count the sensor sends (:class:`~devices.models.WindowModel`). Windows
are learned ``batch_size`` at a time (each predicted first: the prequential accuracy); the learner is
saved to ``checkpoint`` every ``checkpoint_every`` windows learned and at the end. Ctrl-C (in the main
thread) stops the run between readings; it still saves and returns its summary.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from devices.lines import SampleStream, Windower
from devices.models import WindowModel
from devices.ports import Backoff, PortLike, ReconnectingPort, url_opener
from ondevice import ClassifierModel
from ondevice.continual import Learner, ObserveResult
from ondevice.errors import ConfigError

__all__ = ["SerialSession", "SessionConfig", "SessionSummary", "StopReason", "stop_on_interrupt"]

logger = logging.getLogger(__name__)

RECENT_WINDOWS = 50
"""Windows the running accuracy averages over."""

_MAX_DISCOVERED_LABELS = 100
"""More distinct labels than this, without fixed labels, means a sensor column is being read as the label."""

_RECONNECT_ATTEMPTS = 10
"""Reopening attempts after an unplug (about 10 s with the backoff below) before the run ends."""

_QUEUE_READINGS = 8192
"""Readings the reader thread queues ahead of learning; when learning falls this far behind, the oldest
readings go and the summary counts them (overflow)."""

StopReason = Literal["interrupted", "max_samples", "stream_ended", "duration"]


@dataclass(frozen=True)
class SessionConfig:
    """Where a session reads, how it cuts readings into windows, learns, saves and when it stops.

    Args:
        url: a port (``/dev/ttyACM0``, ``COM3``) or pyserial URL (``loop://``, ``socket://HOST:PORT``).
        window: readings per model input window.
        hop: readings between the starts of two windows (None: ``window``, no overlap).
        baudrate: line speed.
        label_column: column of the class name, negative from the end.
        labels: class names in head order; windows of other labels are skipped (None: numbered as they
            appear).
        max_samples, duration_s: stop after this many readings / seconds (None: run on).
        batch_size: windows per ``observe`` call.
        checkpoint: save the learner here (atomically); None: never.
        checkpoint_every: also save every this many windows learned (0: only at the end).
        resync: drop the bytes up to the first newline after each (re)open (a line cut in the middle).
        seed: seeds torch's global generator before the model is built (None: leave it).
        model: the model built at the first labelled window.
    """

    url: str
    window: int = 32
    hop: int | None = None
    baudrate: int = 115200
    label_column: int = -1
    labels: tuple[str, ...] | None = None
    max_samples: int | None = None
    duration_s: float | None = None
    batch_size: int = 1
    checkpoint: str | None = None
    checkpoint_every: int = 100
    resync: bool = True
    seed: int | None = 0
    model: WindowModel = field(default_factory=WindowModel)

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem is not None:
            field_name, what = problem
            raise ConfigError(f"SessionConfig.{field_name} {what}")

    def _problem(self) -> tuple[str, str] | None:
        """The first invalid field and what is wrong with it, or None."""
        if not self.url.strip():
            return "url", "needs a port or pyserial URL, e.g. /dev/ttyACM0, COM3 or loop://"
        if self.window < 1:
            return "window", f"must be at least 1 reading, got {self.window}; e.g. 32 (0.32 s at 100 Hz)"
        if self.hop is not None and self.hop < 1:
            return "hop", (
                f"must be at least 1 reading, got {self.hop}; a hop of {self.window} (the window) makes "
                f"windows that do not overlap"
            )
        if self.baudrate < 1:
            return "baudrate", f"must be a positive line speed, got {self.baudrate}; e.g. 115200"
        if self.max_samples is not None and self.max_samples < 1:
            return "max_samples", f"must be at least 1, got {self.max_samples}; leave it unset to run on"
        if self.duration_s is not None and not 0 < self.duration_s < float("inf"):
            return "duration_s", f"must be a positive number of seconds, got {self.duration_s}"
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            return "labels", f"names a class twice: {','.join(self.labels)}; list each class once"
        if self.batch_size < 1:
            return "batch_size", f"must be at least 1 window, got {self.batch_size}"
        if self.checkpoint_every < 0:
            return (
                "checkpoint_every",
                f"must be >= 0 windows (0: only at the end), got {self.checkpoint_every}",
            )
        return None

    @property
    def step(self) -> int:
        """Readings between the starts of two windows."""
        return self.window if self.hop is None else self.hop

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["labels"] = list(self.labels) if self.labels is not None else None
        out["model"] = self.model.to_dict()
        return out


@dataclass(frozen=True)
class SessionSummary:
    """What a session did: readings, windows, what the stream dropped, how well it learned, why it stopped.

    ``to_dict()`` is the JSON summary of ``ondevice train --serial --json``.
    """

    title: str
    url: str
    window: int
    hop: int
    label_column: int
    labels: list[str]
    samples: int
    windows: int
    windows_learned: int
    windows_skipped: dict[str, int]
    lines: int
    partial_reads: int
    dropped: dict[str, int]
    dropped_total: int
    reconnects: int
    sampling_rate_hz: float | None
    channels: int | None
    prequential_accuracy: float | None
    recent_accuracy: float | None
    buffer_bytes: int
    samples_per_second: float
    learn_seconds: float
    seconds: float
    drifts: int
    skipped_batches: int
    stopped_by: StopReason
    checkpoint: str | None
    scheme: dict[str, Any]
    classes: int
    strategy: str | None = None
    resumed: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"source": "serial", **asdict(self)}


@contextlib.contextmanager
def stop_on_interrupt(stop: Callable[[], None]) -> Iterator[threading.Event]:
    """While inside, Ctrl-C calls ``stop`` and sets the yielded event instead of raising; a second one raises.

    Only the main thread can take SIGINT; elsewhere (an embedding application) nothing changes.
    """
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return
    previous = signal.getsignal(signal.SIGINT)
    restore = previous if previous is not None else signal.default_int_handler

    def handler(signum: int, frame: object) -> None:
        interrupted.set()
        signal.signal(signal.SIGINT, restore)
        stop()

    signal.signal(signal.SIGINT, handler)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, restore)


def _open_hint(error: BaseException) -> str:
    code = getattr(error, "errno", None)
    if isinstance(error, ValueError):
        return (
            "pyserial rejects it: give a device path such as /dev/ttyACM0 or COM3, or a URL such as loop:// "
            "or socket://HOST:PORT, and a standard line speed (SessionConfig.baudrate) such as 115200"
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            "you may not open it: on Linux add yourself to the dialout group (sudo usermod -aG dialout "
            "$USER, then log in again)"
        )
    if code == errno.EBUSY:
        return "another program holds it: close serial monitors (Arduino IDE, screen, minicom) and retry"
    return (
        "check that the device is plugged in and the path is right (python -m serial.tools.list_ports lists "
        "the ports), or give a pyserial URL such as loop:// or socket://HOST:PORT"
    )


def _check_window_fits(learner: Learner, window: int) -> None:
    """Fail now, not at the first window, if one window is too short to train on (batch norm needs more
    than one value per channel; the first window, and a last partial batch, may come alone)."""
    net = learner.model.model
    net.train()
    try:
        with torch.no_grad():
            net(torch.zeros(1, 1, window))
    except ValueError as error:
        raise ConfigError(
            f"SessionConfig.window {window} is too short to train the cnn1d on one window ({error}); use a "
            f"longer window, e.g. 16"
        ) from None


class SerialSession:
    """One run of learning from a serial sensor; :meth:`run` it once.

    Args:
        config: a :class:`SessionConfig`.
        learner: builds the learner for a freshly built model (e.g. ``prepare`` it under a scheme and
            ``create_learner``); called once with a one-channel model to check every option before the
            port opens, then at the first labelled window.
        extra: more metadata for each checkpoint, given the session (e.g. the options of the run).
        on_reading: called after each reading is windowed and learned (a progress display).
        on_learn: called after each ``observe`` with the windows ``x``, their labels ``y`` and the result.

    Raises:
        ConfigError: the learner cannot be built, or one window is too short to train on.
    """

    def __init__(
        self,
        config: SessionConfig,
        learner: Callable[[ClassifierModel], Learner],
        *,
        extra: Callable[[SerialSession], Mapping[str, Any]] | None = None,
        on_reading: Callable[[SerialSession], None] | None = None,
        on_learn: Callable[[torch.Tensor, torch.Tensor, ObserveResult], None] | None = None,
    ) -> None:
        self.config = config
        self._make_learner = learner
        self._extra = extra
        self._on_reading = on_reading
        self._on_learn = on_learn
        self.windower = Windower(config.window, config.hop, labels=config.labels)
        self.learner: Learner | None = None
        self.channels: int | None = None
        self.samples = 0
        self.windows = 0
        self.skipped: dict[str, int] = {}
        self.recent: deque[float] = deque(maxlen=RECENT_WINDOWS)
        self.saved_to: str | None = None
        self.stream: SampleStream | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._since_save = 0
        probe = self.build_learner(1)  # every learner option is checked before the port opens
        _check_window_fits(probe, config.window)
        self.scheme: dict[str, Any] = probe.model.scheme.to_dict()

    # -- the learner --------------------------------------------------------------------------------------

    def build_learner(self, channels: int) -> Learner:
        """A fresh learner whose model takes ``channels`` values per reading."""
        if self.config.seed is not None:
            torch.manual_seed(self.config.seed)
        return self._make_learner(self.config.model.build(channels, self.config.window))

    def restore(
        self, learner: Learner, *, channels: int, windows: int, labels: Sequence[str] | None = None
    ) -> None:
        """Continue from a restored ``learner`` (built for ``channels``) after ``windows`` windows, with the
        class names ``labels`` in head order (None: keep the configured ones)."""
        self.learner, self.channels, self.windows = learner, channels, windows
        if labels is not None:
            self.windower.label_index.update({name: i for i, name in enumerate(labels)})
        self.saved_to = self.config.checkpoint

    @property
    def label_names(self) -> list[str]:
        """Class names in head order."""
        index = self.windower.label_index
        return sorted(index, key=index.__getitem__)

    @property
    def recent_accuracy(self) -> float | None:
        """Prequential accuracy over the last ``RECENT_WINDOWS`` windows learned."""
        return sum(self.recent) / len(self.recent) if self.recent else None

    def setting(self) -> dict[str, Any]:
        """Where the windows came from: in the checkpoint's metadata and in the summary."""
        config = self.config
        return {
            "source": "serial",
            "url": config.url,
            "window": config.window,
            "hop": config.step,
            "label_column": config.label_column,
            "labels": self.label_names,
        }

    def checkpoint_extra(self) -> dict[str, Any]:
        """The metadata saved with the learner: the setting, how to rebuild the model, windows seen."""
        return {
            **self.setting(),
            "model": self.config.model.name,
            "model_kwargs": self.config.model.kwargs(self.channels or 0, self.config.window),
            "windows": self.windows,
            **(self._extra(self) if self._extra is not None else {}),
        }

    # -- windows ------------------------------------------------------------------------------------------

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Take one ``(1, channels, window)`` window; learn once ``batch_size`` are pending."""
        self.windows += 1
        if int(y) < 0:  # no label, or one that the configured labels do not list
            self._skip("unlabelled")
            return
        channels = int(x.shape[1])
        if self.learner is None:
            self.learner = self.build_learner(channels)
            self.channels = channels
        elif channels != self.channels:
            if "channels" not in self.skipped:
                logger.warning(
                    "the sensor now sends %d values per reading, the model takes %d; skipping such windows",
                    channels,
                    self.channels,
                )
            self._skip("channels")
            return
        self._pending.append((x, y))
        if len(self._pending) >= self.config.batch_size:
            self.flush()

    def flush(self) -> None:
        """Learn the pending windows (predicting each first: the prequential accuracy)."""
        if not self._pending or self.learner is None:
            return
        x = torch.cat([pair[0] for pair in self._pending])
        y = torch.cat([pair[1] for pair in self._pending])
        self._pending.clear()
        result = self.learner.observe(x, y)
        if self._on_learn is not None:
            self._on_learn(x, y, result)
        if result.accuracy is not None:
            self.recent.extend([result.accuracy] * result.samples)
            self._since_save += result.samples
        if self.config.checkpoint_every and self._since_save >= self.config.checkpoint_every:
            self.save()

    def save(self) -> None:
        """Save the learner to the checkpoint atomically (nothing to save before the first window)."""
        path = self.config.checkpoint
        if path is None or self.learner is None:
            return
        try:
            self.learner.save(path, extra=self.checkpoint_extra())
        except OSError as error:
            raise ConfigError(
                f"cannot write the checkpoint {path!r}: {error}; set SessionConfig.checkpoint to a path in a "
                f"writable directory"
            ) from None
        self._since_save = 0
        self.saved_to = path

    def _check_label_count(self) -> None:
        config = self.config
        index = self.windower.label_index
        if config.labels is not None or len(index) <= _MAX_DISCOVERED_LABELS:
            return
        names = self.label_names
        examples = ", ".join(repr(name) for name in names[-3:])
        raise ConfigError(
            f"label column {config.label_column} of {config.url!r} gave {len(names)} different labels (e.g. "
            f"{examples}): it looks like a sensor value, not a class name. Choose the column with the class "
            f"name (SessionConfig.label_column INDEX), or the classes to learn (SessionConfig.labels a,b,...)"
        )

    # -- the run ------------------------------------------------------------------------------------------

    def open(self) -> SampleStream:
        """Open the port once (so a bad one fails here, with the reason) and the stream that reopens it.

        Raises:
            ConfigError: the port cannot be opened; the message says what to check.
        """
        if self.stream is not None:
            return self.stream
        config = self.config
        opener = url_opener(config.url, baudrate=config.baudrate)
        try:
            handed = [opener()]
        except (OSError, ValueError) as error:  # serial.SerialException is an OSError
            raise ConfigError(
                f"cannot open the serial port {config.url!r}: {error}. Fix: {_open_hint(error)}"
            ) from None

        def reopen() -> PortLike:
            return handed.pop() if handed else opener()

        self.stream = SampleStream(
            ReconnectingPort(reopen, backoff=Backoff(max_s=2.0, max_attempts=_RECONNECT_ATTEMPTS)),
            label_column=config.label_column,
            resync=config.resync,
            # Read in a thread of its own, so a sensor faster than learning never fills the OS buffer.
            queue_size=_QUEUE_READINGS,
        )
        return self.stream

    def run(self) -> SessionSummary:
        """Read, window and learn until a stop condition; save; the summary. Ctrl-C stops it cleanly."""
        config = self.config
        stream = self.open()
        started = time.perf_counter()
        with stream, stop_on_interrupt(stream.close) as interrupted:
            for sample in stream.samples(max_samples=config.max_samples, duration_s=config.duration_s):
                self.samples += 1
                for x, y in self.windower.push(sample):
                    self._check_label_count()
                    self.add(x, y)
                if self._on_reading is not None:
                    self._on_reading(self)
            self.flush()
            self.save()
        seconds = time.perf_counter() - started
        stopped_by: StopReason
        if interrupted.is_set():
            stopped_by = "interrupted"
        elif config.max_samples is not None and self.samples >= config.max_samples:
            stopped_by = "max_samples"
        elif stream.port.gave_up or config.duration_s is None:
            stopped_by = "stream_ended"
        else:
            stopped_by = "duration"
        return self.summary(seconds=seconds, stopped_by=stopped_by)

    def summary(self, *, seconds: float, stopped_by: StopReason) -> SessionSummary:
        """The figures so far, for a run of ``seconds`` that stopped by ``stopped_by``."""
        config = self.config
        learner = self.learner
        state = learner.state if learner is not None else None
        stats = self.stream.stats if self.stream is not None else None
        channels = stats.channels if stats is not None else None
        return SessionSummary(
            title=f"{config.url}: {channels or '?'} channel(s), window {config.window}, hop {config.step}",
            url=config.url,
            window=config.window,
            hop=config.step,
            label_column=config.label_column,
            labels=self.label_names,
            samples=self.samples,
            windows=self.windows,
            windows_learned=state.trained_samples if state else 0,
            windows_skipped=dict(self.skipped),
            lines=stats.lines if stats else 0,
            partial_reads=stats.partial_reads if stats else 0,
            dropped=dict(stats.dropped) if stats else {},
            dropped_total=stats.dropped_total if stats else 0,
            reconnects=stats.reconnects if stats else 0,
            sampling_rate_hz=stats.sampling_rate_hz if stats else None,
            channels=channels,
            prequential_accuracy=state.prequential_accuracy if state and state.trained_samples else None,
            recent_accuracy=self.recent_accuracy,
            buffer_bytes=learner.buffer_bytes if learner is not None else 0,
            samples_per_second=self.samples / seconds if seconds > 0 else 0.0,
            learn_seconds=state.train_seconds if state else 0.0,
            seconds=seconds,
            drifts=state.drifts if state else 0,
            skipped_batches=state.skipped_batches if state else 0,
            stopped_by=stopped_by,
            checkpoint=self.saved_to,
            scheme=self.scheme,
            classes=learner.num_classes if learner is not None else 0,
        )
