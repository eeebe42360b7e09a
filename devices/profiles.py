"""Device profiles: what a board or microcontroller has, and how much of it a training step may use.

A :class:`DeviceProfile` is a frozen record of a device's cores, clock, RAM (or SRAM) and flash, plus the
share of memory its runtime keeps for itself (``reserved_bytes``). The rest is the
:attr:`DeviceProfile.training_budget_bytes`, which :meth:`DeviceProfile.to_budget` turns into a
:class:`memory.Budget`. Profiles live in a registry (:func:`register_profile`, :func:`get_profile`,
:func:`list_profiles`); the built-in ones follow the figures in the project's REFERENCES (Devices).

How the runtime share is sized
------------------------------
*Linux boards* (Raspberry Pi, Jetson) keep, before a training step allocates anything:

- the operating system: kernel, firmware/GPU memory split, systemd, sshd and friends of a headless 64-bit
  Raspberry Pi OS Lite -- :data:`LINUX_OS_BYTES` (160 MiB; a headless JetPack needs more,
  :data:`JETSON_OS_BYTES`, 512 MiB, because L4T reserves carve-outs and runs more services);
- the Python interpreter with torch imported -- :data:`TORCH_RUNTIME_BYTES` (110 MiB RSS for the CPU
  wheel on aarch64);
- an idle Flower SuperNode and its ClientApp executor -- :data:`FLOWER_IDLE_BYTES` (265 MiB RSS, measured
  per Pi, see REFERENCES);
- headroom for page cache and allocator fragmentation -- :data:`LINUX_HEADROOM_FRACTION` (10 % of RAM).

*The training step's process.* What is left (``training_budget_bytes``) is budgeted as the resident memory
the eager step adds to its process above ``import torch, ondevice``, not as tensor bytes alone: a Linux
board's profile carries :data:`memory.process.STEP_OVERHEAD_BYTES` (kernel code paged in by the first
step, the model's modules, allocator slack) and :data:`memory.process.RSS_PER_TENSOR_BYTE` (resident bytes
per byte of the step's tensor peak, under the SDK's process policy), and its budget compares
``peak * factor + overhead`` (``memory.report.needed_terms``). ``runtime_bytes`` records the import's
own resident size inside the reserve; :func:`devices.detect` can measure it on the machine itself.

The Raspberry Pi Zero 2 W (512 MB) cannot hold an idle Flower SuperNode next to torch with any room left,
so its profile reserves only the OS, torch and headroom: it trains stand-alone, not in a Flower fleet.

*Microcontrollers* keep the stack, the RTOS/HAL, serial/USB buffers and the framed link's buffers:
:data:`MCU_RESERVE_FRACTION` (1/8) of SRAM, at least :data:`MCU_MIN_RESERVE_BYTES` (32 KiB). The ESP32
parts keep far more (IRAM/cache, FreeRTOS, Wi-Fi/BLE stacks), so their profiles reserve 200 KiB and
192 KiB, which leaves the ~320 KiB of heap ESP-IDF reports as free. On MCUs frozen weights live in flash
(int8, as in TinyTL and tiny-training), so a budget made from an MCU profile does not count them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from memory import Budget
from memory.process import RSS_PER_TENSOR_BYTE, STEP_OVERHEAD_BYTES
from ondevice.errors import ConfigError, UnknownNameError

__all__ = [
    "DeviceKind",
    "DeviceProfile",
    "get_profile",
    "linux_reserved_bytes",
    "list_profiles",
    "mcu_reserved_bytes",
    "register_profile",
]

logger = logging.getLogger(__name__)

KiB = 1024
MiB = 1024**2
GiB = 1024**3

LINUX_OS_BYTES = 160 * MiB
"""Kernel, firmware/GPU split and services of a headless 64-bit Raspberry Pi OS Lite."""
JETSON_OS_BYTES = 512 * MiB
"""Kernel, carve-outs and services of a headless JetPack (L4T) install."""
TORCH_RUNTIME_BYTES = 110 * MiB
"""Resident size of a Python interpreter after ``import torch`` (CPU wheel, aarch64)."""
FLOWER_IDLE_BYTES = 265 * MiB
"""Resident size of an idle Flower SuperNode plus its ClientApp executor (REFERENCES, Devices)."""
LINUX_HEADROOM_FRACTION = 0.10
"""Share of RAM left for page cache and allocator fragmentation on Linux boards."""
MCU_RESERVE_FRACTION = 1 / 8
"""Share of SRAM kept for stack, RTOS/HAL and serial/link buffers on microcontrollers."""
MCU_MIN_RESERVE_BYTES = 32 * KiB
"""Smallest runtime reserve on a microcontroller."""


class DeviceKind(StrEnum):
    """The two kinds of device the SDK budgets for."""

    LINUX_BOARD = "linux-board"
    MCU = "mcu"


def linux_reserved_bytes(
    ram_bytes: int, *, os_bytes: int = LINUX_OS_BYTES, with_flower: bool = True, with_os: bool = True,
    runtime_bytes: int = TORCH_RUNTIME_BYTES,
) -> int:  # fmt: skip
    """Runtime share of a Linux board: OS + Python/torch + (idle Flower) + 10 % headroom of ``ram_bytes``.

    ``with_os=False`` leaves the OS out, for a process limited by a cgroup (the OS lives outside it);
    ``runtime_bytes`` replaces the default resident size of ``import torch, ondevice`` with a measured one.
    """
    reserve = runtime_bytes + int(LINUX_HEADROOM_FRACTION * ram_bytes)
    if with_os:
        reserve += os_bytes
    if with_flower:
        reserve += FLOWER_IDLE_BYTES
    return reserve


def mcu_reserved_bytes(sram_bytes: int) -> int:
    """Runtime share of a microcontroller: 1/8 of SRAM for stack, RTOS and buffers, at least 32 KiB."""
    return max(MCU_MIN_RESERVE_BYTES, int(sram_bytes * MCU_RESERVE_FRACTION))


@dataclass(frozen=True)
class DeviceProfile:
    """What a device has and how much of its memory one training step may use.

    Attributes:
        name: registry key, e.g. ``"rpi-4b-4gb"`` or ``"stm32f746"``.
        kind: a Linux board or a microcontroller.
        memory_bytes: RAM of a Linux board or SRAM of a microcontroller.
        flash_bytes: on-chip (or board) flash of a microcontroller; ``None`` for Linux boards and parts
            with external flash only.
        cores: CPU cores (usable ones, for a detected profile).
        clock_mhz: CPU clock.
        reserved_bytes: memory the runtime keeps for itself (see the module docstring for the figures).
        description: a human-readable line (board name, what was detected).
        runtime_bytes: resident size of the runtime (``import torch, ondevice``), part of
            ``reserved_bytes``; ``None`` where there is no Python runtime (a microcontroller).
        process_overhead_bytes: resident memory a training step's process adds beyond its tensors (see
            the module docstring); when set, :meth:`to_budget` budgets the step as process RSS. ``None``
            budgets tensor bytes only (microcontrollers).
        rss_per_tensor_byte: resident bytes per byte of the step's tensor peak (>= 1).
    """

    name: str
    kind: DeviceKind
    memory_bytes: int
    flash_bytes: int | None
    cores: int
    clock_mhz: int
    reserved_bytes: int
    description: str = field(default="", compare=False)
    runtime_bytes: int | None = None
    process_overhead_bytes: int | None = None
    rss_per_tensor_byte: float = RSS_PER_TENSOR_BYTE

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"DeviceProfile.name must be a non-empty string, got {self.name!r}")
        try:
            object.__setattr__(self, "kind", DeviceKind(self.kind))
        except ValueError:
            raise ConfigError(
                f"DeviceProfile {self.name!r}: kind must be one of {[k.value for k in DeviceKind]}, "
                f"got {self.kind!r}"
            ) from None
        for attr in ("memory_bytes", "cores", "clock_mhz"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"DeviceProfile {self.name!r}: {attr} must be a positive int, got {value!r}"
                )
        if self.flash_bytes is not None and (not isinstance(self.flash_bytes, int) or self.flash_bytes <= 0):
            raise ConfigError(
                f"DeviceProfile {self.name!r}: flash_bytes must be a positive int or None, got "
                f"{self.flash_bytes!r}"
            )
        if not isinstance(self.reserved_bytes, int) or not 0 <= self.reserved_bytes < self.memory_bytes:
            raise ConfigError(
                f"DeviceProfile {self.name!r}: reserved_bytes must be an int in [0, memory_bytes="
                f"{self.memory_bytes}), got {self.reserved_bytes!r}; reserve less for the runtime or give "
                f"the device more memory"
            )
        for attr in ("runtime_bytes", "process_overhead_bytes"):
            value = getattr(self, attr)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(
                    f"DeviceProfile {self.name!r}: {attr} must be an int >= 0 or None, got {value!r}"
                )
        factor = self.rss_per_tensor_byte
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not 1 <= factor < 100:
            raise ConfigError(
                f"DeviceProfile {self.name!r}: rss_per_tensor_byte must be a number in [1, 100), "
                f"got {factor!r}"
            )

    @property
    def training_budget_bytes(self) -> int:
        """Memory a training step may use: ``memory_bytes - reserved_bytes``."""
        return self.memory_bytes - self.reserved_bytes

    def to_budget(self) -> Budget:
        """This device's :class:`memory.Budget`.

        Linux boards keep frozen float32 weights in RAM, so they count against the budget; an MCU keeps
        int8 weights in flash, so they do not (TinyTL, tiny-training). A profile with
        ``process_overhead_bytes`` (every built-in Linux board) budgets the step's process RSS.
        """
        if self.kind is DeviceKind.MCU:
            return Budget.from_profile(self, count_frozen_params=False, frozen_param_bits=8)
        return Budget.from_profile(self, count_frozen_params=True, frozen_param_bits=32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, plus ``training_budget_bytes``."""
        data = asdict(self)
        data["kind"] = self.kind.value
        data["training_budget_bytes"] = self.training_budget_bytes
        return data


_REGISTRY: dict[str, DeviceProfile] = {}
_LOCK = threading.Lock()


def register_profile(profile: DeviceProfile) -> DeviceProfile:
    """Add ``profile`` to the registry; a name that is already registered is an error."""
    if not isinstance(profile, DeviceProfile):
        raise ConfigError(f"register_profile expects a DeviceProfile, got {type(profile).__name__}")
    with _LOCK:
        if profile.name in _REGISTRY:
            raise ConfigError(
                f"a device profile named {profile.name!r} is already registered; pick another name"
            )
        _REGISTRY[profile.name] = profile
    return profile


def get_profile(name: str) -> DeviceProfile:
    """The registered profile called ``name``; a miss lists the registered names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError("device profile", name, _REGISTRY) from None


def list_profiles(kind: DeviceKind | str | None = None) -> list[DeviceProfile]:
    """Registered profiles (of one ``kind`` when given), in registration order."""
    wanted = DeviceKind(kind) if kind is not None else None
    return [p for p in _REGISTRY.values() if wanted is None or p.kind is wanted]


_LINUX_PROCESS: dict[str, Any] = {
    "runtime_bytes": TORCH_RUNTIME_BYTES,
    "process_overhead_bytes": STEP_OVERHEAD_BYTES,
    "rss_per_tensor_byte": RSS_PER_TENSOR_BYTE,
}
"""What a Linux board's profile says about its training process (see the module docstring)."""


def _pi(name: str, ram_bytes: int, cores: int, clock_mhz: int, board: str, *, flower: bool = True) -> None:
    register_profile(
        DeviceProfile(
            name=name,
            kind=DeviceKind.LINUX_BOARD,
            memory_bytes=ram_bytes,
            flash_bytes=None,
            cores=cores,
            clock_mhz=clock_mhz,
            reserved_bytes=linux_reserved_bytes(ram_bytes, with_flower=flower),
            description=board,
            **_LINUX_PROCESS,
        )
    )


def _mcu(
    name: str,
    sram_bytes: int,
    flash_bytes: int | None,
    cores: int,
    clock_mhz: int,
    part: str,
    *,
    reserved_bytes: int | None = None,
) -> None:
    register_profile(
        DeviceProfile(
            name=name,
            kind=DeviceKind.MCU,
            memory_bytes=sram_bytes,
            flash_bytes=flash_bytes,
            cores=cores,
            clock_mhz=clock_mhz,
            reserved_bytes=mcu_reserved_bytes(sram_bytes) if reserved_bytes is None else reserved_bytes,
            description=part,
        )
    )


def _register_builtin() -> None:
    _pi(
        "rpi-zero-2w",
        512 * MiB,
        4,
        1000,
        "Raspberry Pi Zero 2 W, 4x Cortex-A53 (no room for Flower)",
        flower=False,
    )
    _pi("rpi-3b-plus", 1 * GiB, 4, 1400, "Raspberry Pi 3 Model B+, 4x Cortex-A53")
    for gb in (1, 2, 4, 8):
        _pi(f"rpi-4b-{gb}gb", gb * GiB, 4, 1800, f"Raspberry Pi 4 Model B {gb} GB, 4x Cortex-A72")
    for gb in (1, 2, 4, 8, 16):
        _pi(f"rpi-5-{gb}gb", gb * GiB, 4, 2400, f"Raspberry Pi 5 {gb} GB, 4x Cortex-A76")
    for gb in (2, 4):
        register_profile(
            DeviceProfile(
                name=f"jetson-nano-{gb}gb",
                kind=DeviceKind.LINUX_BOARD,
                memory_bytes=gb * GiB,
                flash_bytes=None,
                cores=4,
                clock_mhz=1430,
                reserved_bytes=linux_reserved_bytes(gb * GiB, os_bytes=JETSON_OS_BYTES),
                **_LINUX_PROCESS,
                description=f"NVIDIA Jetson Nano {gb} GB, 4x Cortex-A57 + 128-core Maxwell GPU (shared RAM)",
            )
        )
    for gb in (4, 8):
        register_profile(
            DeviceProfile(
                name=f"jetson-orin-nano-{gb}gb",
                kind=DeviceKind.LINUX_BOARD,
                memory_bytes=gb * GiB,
                flash_bytes=None,
                cores=6,
                clock_mhz=1510,
                reserved_bytes=linux_reserved_bytes(gb * GiB, os_bytes=JETSON_OS_BYTES),
                **_LINUX_PROCESS,
                description=f"NVIDIA Jetson Orin Nano {gb} GB, 6x Cortex-A78AE + Ampere GPU (shared RAM)",
            )
        )
    _mcu("stm32f746", 320 * KiB, 1 * MiB, 1, 216, "STM32F746, Cortex-M7 (MCUNet's 320 KB board)")
    _mcu(
        "stm32h743",
        1 * MiB,
        2 * MiB,
        1,
        480,
        "STM32H743, Cortex-M7; SRAM is split in domains, the largest block is 512 KB AXI SRAM",
    )
    _mcu("nrf52840", 256 * KiB, 1 * MiB, 1, 64, "nRF52840 (Arduino Nano 33 BLE Sense), Cortex-M4F")
    _mcu(
        "esp32",
        520 * KiB,
        None,
        2,
        240,
        "ESP32, 2x Xtensa LX6, external flash; Wi-Fi/BLE stacks reserved",
        reserved_bytes=200 * KiB,
    )
    _mcu(
        "esp32-s3",
        512 * KiB,
        None,
        2,
        240,
        "ESP32-S3, 2x Xtensa LX7, external flash; Wi-Fi/BLE reserved",
        reserved_bytes=192 * KiB,
    )
    _mcu(
        "rp2040", 264 * KiB, 2 * MiB, 2, 133, "RP2040 (Raspberry Pi Pico), 2x Cortex-M0+, 2 MB external QSPI"
    )


_register_builtin()
