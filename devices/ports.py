"""Serial ports that survive being unplugged: pyserial URLs, pty pairs and reconnection with backoff.

:class:`ReconnectingPort` wraps anything that opens a pyserial-like port (a URL such as ``/dev/ttyACM0``
or ``loop://``, or a callable). Its ``read``/``write`` never raise on an unplugged device: a
``SerialException``/``OSError`` closes the port and the next ``read`` reopens it with exponential
backoff (:class:`Backoff`), counting ``reconnects``. :func:`open_pty` makes a real pseudo-terminal pair in
raw mode, and :class:`PtyPort` gives its master end the same small port interface, so tests and examples
run the device side (:mod:`devices.testing.emulator`) against a host that opens the slave path like a real
``/dev/ttyACM0``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ondevice.errors import ConfigError

__all__ = ["Backoff", "PortLike", "PtyPort", "ReconnectingPort", "open_pty", "url_opener"]

logger = logging.getLogger(__name__)

DEFAULT_BAUDRATE = 115200
"""The Edge Impulse data forwarder's default rate (REFERENCES, Serial)."""


@runtime_checkable
class PortLike(Protocol):
    """The part of ``serial.Serial`` this package uses."""

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes) -> int | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between reconnection attempts: ``initial_s * factor**k``, capped at ``max_s``.

    ``max_attempts=None`` retries for ever (a device may stay unplugged for hours); otherwise the port
    gives up after that many failed attempts in a row.
    """

    initial_s: float = 0.05
    factor: float = 2.0
    max_s: float = 2.0
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s < self.initial_s or self.factor < 1:
            raise ConfigError(
                f"Backoff needs 0 < initial_s <= max_s and factor >= 1, got initial_s={self.initial_s}, "
                f"max_s={self.max_s}, factor={self.factor}"
            )
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ConfigError(f"Backoff.max_attempts must be >= 1 or None, got {self.max_attempts}")

    def delays(self) -> Iterator[float]:
        """The successive waits, ``max_attempts`` of them (or endless)."""
        delay, attempt = self.initial_s, 0
        while self.max_attempts is None or attempt < self.max_attempts:
            yield delay
            attempt += 1
            delay = min(self.max_s, delay * self.factor)


def url_opener(
    url: str, *, baudrate: int = DEFAULT_BAUDRATE, timeout_s: float = 0.05, exclusive: bool = False
) -> Callable[[], PortLike]:
    """A callable that opens ``url`` with ``serial.serial_for_url`` (paths, ``loop://``, ``socket://``...).

    The read timeout is short so readers can notice ``close()`` quickly; partial lines and frames are
    reassembled by the callers. ``exclusive`` locks a POSIX device against a second opener.
    """

    def open_port() -> PortLike:
        import serial

        if exclusive:
            return serial.serial_for_url(
                url, baudrate=baudrate, timeout=timeout_s, write_timeout=2.0, exclusive=True
            )
        return serial.serial_for_url(url, baudrate=baudrate, timeout=timeout_s, write_timeout=2.0)

    return open_port


def _read_available(port: PortLike, max_bytes: int) -> bytes:
    waiting = getattr(port, "in_waiting", 0) or 0
    return port.read(max(1, min(int(waiting), max_bytes)))


class ReconnectingPort:
    """A port that reopens itself after an unplug, with exponential backoff; never raises on I/O errors.

    ``read`` returns ``b""`` when nothing arrived (timeout), when the port is down or after ``close()``;
    ``write`` returns ``False`` when the bytes could not be written. ``reconnects`` counts successful
    reopenings after a failure; ``gave_up`` turns true once ``backoff.max_attempts`` were exhausted.
    """

    def __init__(
        self,
        opener: Callable[[], PortLike] | str,
        *,
        backoff: Backoff | None = None,
        baudrate: int = DEFAULT_BAUDRATE,
        read_timeout_s: float = 0.05,
    ) -> None:
        self._opener = (
            url_opener(opener, baudrate=baudrate, timeout_s=read_timeout_s)
            if isinstance(opener, str)
            else opener
        )
        self.backoff = backoff or Backoff()
        self.reconnects = 0
        self.failures = 0
        self.gave_up = False
        self._port: PortLike | None = None
        self._ever_opened = False
        self._broken = False
        self._closed = threading.Event()
        self._lock = threading.RLock()
        self._write_lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        """Whether a port is currently open and not known to be broken."""
        return self._port is not None and not self._broken

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed.is_set()

    def _drop(self, error: BaseException | None) -> None:
        with self._lock:
            port, self._port, self._broken = self._port, None, False
        if port is not None:
            if error is not None:
                self.failures += 1
                logger.warning("serial port lost (%s: %s); reconnecting", type(error).__name__, error)
            with contextlib.suppress(Exception):
                port.close()

    def ensure_open(self) -> bool:
        """Open the port, retrying with backoff; ``False`` once closed or after ``max_attempts`` failures."""
        if self._port is not None and not self._broken:
            return True
        if self._broken:
            self._drop(None)
        with self._lock:
            if self._port is not None:
                return True
            attempt = 0
            delays = self.backoff.delays()
            while not self._closed.is_set():
                try:
                    port = self._opener()
                except Exception as error:  # SerialException, OSError, ValueError from a bad URL...
                    attempt += 1
                    delay = next(delays, None)
                    if delay is None:
                        logger.error("giving up on the serial port after %d attempts: %s", attempt, error)
                        self.gave_up = True
                        return False
                    logger.info("cannot open serial port (%s); retrying in %.2f s", error, delay)
                    self._closed.wait(delay)
                    continue
                if self._closed.is_set():
                    with contextlib.suppress(Exception):
                        port.close()
                    return False
                if self._ever_opened:
                    self.reconnects += 1
                    logger.info("serial port reconnected (reconnect #%d)", self.reconnects)
                self._ever_opened = True
                self._port = port
                return True
            return False

    def read(self, max_bytes: int = 4096) -> bytes:
        """Up to ``max_bytes`` that are waiting (at least one, or ``b""`` after the read timeout)."""
        if not self.ensure_open():
            return b""
        port = self._port
        if port is None:
            return b""
        try:
            return _read_available(port, max_bytes)
        except Exception as error:  # SerialException, OSError, or a port closed under our feet
            if not self._closed.is_set():
                self._drop(error)
            return b""

    def write(self, data: bytes) -> bool:
        """Write all of ``data``; ``False`` if the port is down (the reader side reconnects)."""
        port = self._port
        if port is None or self._broken or self._closed.is_set():
            return False
        try:
            with self._write_lock:
                port.write(data)
                flush = getattr(port, "flush", None)
                if flush is not None:
                    flush()
            return True
        except Exception as error:
            logger.warning("serial write failed (%s: %s)", type(error).__name__, error)
            if self._port is port:  # a port the reader already replaced must not break the new one
                self._broken = True
                self.failures += 1
            return False

    def close(self) -> None:
        """Close the port for good; blocked readers return within one read timeout."""
        self._closed.set()
        with self._lock:
            port, self._port = self._port, None
        if port is not None:
            with contextlib.suppress(Exception):
                cancel = getattr(port, "cancel_read", None)
                if cancel is not None:
                    cancel()
            with contextlib.suppress(Exception):
                port.close()

    def __enter__(self) -> ReconnectingPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PtyPort:
    """The master end of a pseudo-terminal with the port interface (``read``/``write``/``close``).

    Reads wait at most ``timeout_s``; an ``EIO`` while no one has the slave open reads as ``b""``.
    """

    def __init__(self, master_fd: int, *, timeout_s: float = 0.05, slave_fd: int | None = None) -> None:
        self.fd = master_fd
        self.timeout_s = timeout_s
        self._slave_fd = slave_fd
        self._closed = False

    @property
    def in_waiting(self) -> int:
        """Bytes waiting to be read."""
        import fcntl
        import struct
        import termios

        if self._closed:
            return 0
        try:
            raw = fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return 0
        return int(struct.unpack("I", raw)[0])

    def read(self, size: int = 1) -> bytes:
        """Up to ``size`` bytes, waiting at most ``timeout_s`` for the first."""
        if self._closed:
            raise OSError("pty port is closed")
        ready, _, _ = select.select([self.fd], [], [], self.timeout_s)
        if not ready:
            return b""
        try:
            return os.read(self.fd, size)
        except OSError:
            return b""

    def write(self, data: bytes) -> int:
        """Write all of ``data``."""
        if self._closed:
            raise OSError("pty port is closed")
        view = memoryview(data)
        while view:
            _, ready, _ = select.select([], [self.fd], [], 1.0)
            if not ready:
                raise TimeoutError("pty write blocked for 1 s (nobody reads the other end)")
            written = os.write(self.fd, view)
            view = view[written:]
        return len(data)

    def close(self) -> None:
        """Close both ends held here: to the host, this is the device being unplugged."""
        if self._closed:
            return
        self._closed = True
        for fd in (self.fd, self._slave_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)


def open_pty(*, timeout_s: float = 0.05) -> tuple[PtyPort, str]:
    """A raw-mode pty pair: the device-side :class:`PtyPort` and the slave path a host opens.

    Both ends are set raw (``tty.setraw``: no echo, no line editing, no CR/LF translation), so bytes pass
    unchanged as on a USB CDC serial line. The slave fd stays open in the returned port so the pair
    survives the host closing and reopening the path.
    """
    import pty
    import tty

    master, slave = pty.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    return PtyPort(master, timeout_s=timeout_s, slave_fd=slave), os.ttyname(slave)
