"""Stand-ins for hardware, for tests, examples and trying the SDK without devices: never imported by
``devices`` itself.

- :mod:`devices.testing.emulator`: the microcontroller side of the line and frame protocols in Python (a
  sensor printing readings, a device applying parameter deltas over :mod:`devices.link`).
- :mod:`devices.testing.standin`: stand-in Raspberry Pi hosts on loopback (a real SSH server per host with
  ``sudo``, ``systemctl`` and ``pip`` stand-ins) for rehearsing ``ondevice fleet`` without boards.
"""
