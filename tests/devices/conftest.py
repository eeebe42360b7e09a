"""Fixtures for device tests: raw pty pairs that look like USB serial devices, and a replug helper."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.ports import PtyPort, open_pty


class Socket:
    """A stable device path (like /dev/serial/by-id/...) that can be unplugged and replugged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ports: list[PtyPort] = []

    def plug(self) -> PtyPort:
        """A fresh pty; the stable path now points at its slave end."""
        port, slave = open_pty()
        tmp = self.path.with_suffix(".new")
        os.symlink(slave, tmp)
        os.replace(tmp, self.path)
        self.ports.append(port)
        return port

    def unplug(self) -> None:
        """Close the device end and remove the path, as when a USB cable is pulled."""
        self.ports[-1].close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        for port in self.ports:
            port.close()


@pytest.fixture
def pty_pair() -> Iterator[tuple[PtyPort, str]]:
    """The device-side end of a raw pty and the path a host opens."""
    port, path = open_pty()
    yield port, path
    port.close()


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Socket]:
    """A replugable device path."""
    socket = Socket(tmp_path / "ttyDEVICE")
    yield socket
    socket.close()
