"""Devices: profiles and detection, serial sample streams and framed links, Raspberry Pi fleets.

- :func:`get_profile` / :func:`list_profiles` / :func:`register_profile`: what a board or MCU has and how
  much of it a training step may use (``profile.to_budget()`` -> :class:`memory.Budget`);
  :func:`detect` builds the profile of the machine it runs on.
- :class:`SampleStream` + :func:`windows`: sensor readings from a serial line (Edge Impulse forwarder
  format) cut into ``(x, y)`` tensors; :class:`SerialSession` learns from a live sensor with them
  (reconnects, windows, the learner built at the first window, checkpoints, Ctrl-C).
- :class:`Link`: framed (COBS + CRC32), acknowledged, reconnecting link for parameter deltas and
  commands; :mod:`devices.testing.emulator` is the device side in Python.
- :mod:`devices.fleet`: inventory and SSH commands for a fleet of Raspberry Pis (needs ``asyncssh``, the
  ``fleet`` extra; imported only when used).

pyserial is imported when a port is opened and asyncssh only by :mod:`devices.fleet`.
"""

from devices.detect import detect
from devices.lines import Sample, SampleStream, Windower, windows
from devices.link import Link
from devices.models import WindowModel, feature_model
from devices.ports import Backoff
from devices.profiles import DeviceKind, DeviceProfile, get_profile, list_profiles, register_profile
from devices.session import SerialSession, SessionConfig, SessionSummary

__all__ = [
    "Backoff",
    "DeviceKind",
    "DeviceProfile",
    "Link",
    "Sample",
    "SampleStream",
    "SerialSession",
    "SessionConfig",
    "SessionSummary",
    "WindowModel",
    "Windower",
    "detect",
    "feature_model",
    "get_profile",
    "list_profiles",
    "register_profile",
    "windows",
]
