"""Detect the device this code runs on: Raspberry Pi revision codes, cgroup memory and CPU limits.

Every file is read below a ``root`` directory (``/`` by default), so tests feed fake ``/proc`` and
``/sys`` trees. The detected profile takes the *smaller* of physical RAM and the cgroup memory limit
(``psutil`` ignores cgroup limits, see REFERENCES) and the usable CPUs (affinity mask and cgroup
``cpu.max`` quota). With ``measure_runtime=True`` it also measures the runtime's fixed cost on this
machine -- the resident size of a fresh ``python -c "import torch, ondevice, memory"``
(:func:`measure_runtime_bytes`) -- and reserves that instead of the built-in figure.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from devices.profiles import (
    TORCH_RUNTIME_BYTES,
    DeviceKind,
    DeviceProfile,
    get_profile,
    linux_reserved_bytes,
)
from memory.process import RSS_PER_TENSOR_BYTE, STEP_OVERHEAD_BYTES
from ondevice.errors import UnknownNameError

__all__ = [
    "PiRevision",
    "SystemInfo",
    "decode_pi_revision",
    "detect",
    "detect_system",
    "measure_runtime_bytes",
]

logger = logging.getLogger(__name__)

MiB = 1024**2

# New-style revision codes (bit 23 set): "NOQuuuWuFMMMCCCCPPPPTTTTTTTTRRRR" from the Raspberry Pi docs.
_PI_TYPES: dict[int, str] = {
    0x04: "2B",
    0x08: "3B",
    0x0D: "3B+",
    0x0E: "3A+",
    0x11: "4B",
    0x12: "Zero 2 W",
    0x13: "400",
    0x14: "CM4",
    0x15: "CM4S",
    0x17: "5",
    0x18: "CM5",
    0x19: "500",
    0x1A: "CM5 Lite",
}
_PI_MEMORY_MB = {0: 256, 1: 512, 2: 1024, 3: 2048, 4: 4096, 5: 8192, 6: 16384}
# Board type -> registered profile name pattern ({gb} is the memory size in GB).
_PI_PROFILES: dict[str, str] = {
    "Zero 2 W": "rpi-zero-2w",
    "3B+": "rpi-3b-plus",
    "4B": "rpi-4b-{gb}gb",
    "400": "rpi-4b-{gb}gb",
    "CM4": "rpi-4b-{gb}gb",
    "5": "rpi-5-{gb}gb",
    "500": "rpi-5-{gb}gb",
    "CM5": "rpi-5-{gb}gb",
    "CM5 Lite": "rpi-5-{gb}gb",
}
_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a huge page-aligned number


@dataclass(frozen=True)
class PiRevision:
    """A decoded new-style Raspberry Pi revision code."""

    code: int
    board: str
    memory_bytes: int
    pcb_revision: int

    @property
    def profile_name(self) -> str | None:
        """The registered profile for this board, if there is one."""
        pattern = _PI_PROFILES.get(self.board)
        if pattern is None:
            return None
        return pattern.format(gb=max(1, self.memory_bytes // 1024**3))


def decode_pi_revision(code: int | str) -> PiRevision | None:
    """Decode a Raspberry Pi revision code such as ``"c03114"`` (Pi 4B 4 GB); ``None`` for old-style codes.

    Bit 23 marks a new-style code; bits 4-11 are the board type and bits 20-22 the memory size
    (0 = 256 MB ... 6 = 16 GB), as documented in Raspberry Pi's "Revision codes".
    """
    try:
        value = int(code, 16) if isinstance(code, str) else int(code)
    except ValueError:
        return None
    if not value & (1 << 23):
        return None
    board = _PI_TYPES.get((value >> 4) & 0xFF, f"type 0x{(value >> 4) & 0xFF:02x}")
    memory_mb = _PI_MEMORY_MB.get((value >> 20) & 0x7)
    if memory_mb is None:
        return None
    return PiRevision(code=value, board=board, memory_bytes=memory_mb * MiB, pcb_revision=value & 0xF)


@dataclass(frozen=True)
class SystemInfo:
    """What :func:`detect_system` measured."""

    ram_bytes: int
    cgroup_memory_limit_bytes: int | None
    cpus: int
    cgroup_cpu_limit: float | None
    clock_mhz: int
    machine: str
    model: str
    pi_revision: PiRevision | None

    @property
    def memory_bytes(self) -> int:
        """Memory this process may use: the smaller of RAM and the cgroup limit."""
        if self.cgroup_memory_limit_bytes is None:
            return self.ram_bytes
        return min(self.ram_bytes, self.cgroup_memory_limit_bytes)

    @property
    def usable_cpus(self) -> int:
        """CPUs this process may use: affinity mask, capped by the cgroup quota (rounded up)."""
        if self.cgroup_cpu_limit is None:
            return self.cpus
        return max(1, min(self.cpus, math.ceil(self.cgroup_cpu_limit)))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _is_real_root(root: Path) -> bool:
    try:
        return root.resolve() == Path("/")
    except OSError:  # pragma: no cover
        return False


def _cpuinfo_field(cpuinfo: str, key: str) -> str | None:
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return None


def _ram_bytes(root: Path) -> int:
    if _is_real_root(root):
        import psutil

        return int(psutil.virtual_memory().total)
    meminfo = _read(root / "proc" / "meminfo") or ""
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", meminfo, re.MULTILINE)
    if match is None:
        raise FileNotFoundError(f"no MemTotal in {root / 'proc' / 'meminfo'}")
    return int(match.group(1)) * 1024


def _cgroup_dirs(root: Path, controller: str) -> list[Path]:
    """cgroup directories of this process for ``controller``, innermost first (v2 and v1 layouts)."""
    base = root / "sys" / "fs" / "cgroup"
    dirs: list[Path] = []
    for line in (_read(root / "proc" / "self" / "cgroup") or "").splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            top = base
        elif controller in controllers.split(","):
            top = base / controllers
            if not top.is_dir():
                top = base / controller
        else:
            continue
        path = top / rel
        while True:
            dirs.append(path)
            if path == top or path.parent == path:
                break
            path = path.parent
    dirs.extend([base, base / controller])
    return dirs


def _cgroup_memory_limit(root: Path) -> int | None:
    limits: list[int] = []
    for directory in _cgroup_dirs(root, "memory"):
        for name in ("memory.max", "memory.limit_in_bytes"):
            text = (_read(directory / name) or "").strip()
            if text.isdigit() and int(text) < _UNLIMITED:
                limits.append(int(text))
    return min(limits) if limits else None


def _cgroup_cpu_limit(root: Path) -> float | None:
    limits: list[float] = []
    for directory in _cgroup_dirs(root, "cpu"):
        text = (_read(directory / "cpu.max") or "").split()
        if len(text) == 2 and text[0].isdigit() and text[1].isdigit() and int(text[1]) > 0:
            limits.append(int(text[0]) / int(text[1]))
        quota = (_read(directory / "cpu.cfs_quota_us") or "").strip()
        period = (_read(directory / "cpu.cfs_period_us") or "").strip()
        if quota.isdigit() and period.isdigit() and int(period) > 0:
            limits.append(int(quota) / int(period))
    return min(limits) if limits else None


def detect_system(root: str | os.PathLike[str] = "/") -> SystemInfo:
    """Measure RAM, cgroup limits, CPUs, clock and board identity below ``root``."""
    base = Path(root)
    cpuinfo = _read(base / "proc" / "cpuinfo") or ""
    if _is_real_root(base) and hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:
        cpus = sum(1 for line in cpuinfo.splitlines() if re.match(r"^processor\s*:", line)) or 1
    mhz_text = _cpuinfo_field(cpuinfo, "cpu MHz")
    max_freq = _read(base / "sys" / "devices" / "system" / "cpu" / "cpu0" / "cpufreq" / "cpuinfo_max_freq")
    if max_freq and max_freq.strip().isdigit():
        clock_mhz = int(max_freq.strip()) // 1000
    elif mhz_text:
        clock_mhz = int(float(mhz_text))
    else:
        clock_mhz = 0
    model = _read(base / "proc" / "device-tree" / "model") or _cpuinfo_field(cpuinfo, "Model") or ""
    model = model.strip("\x00\n ") or (_cpuinfo_field(cpuinfo, "model name") or "")
    revision_text = _cpuinfo_field(cpuinfo, "Revision")
    revision = decode_pi_revision(revision_text) if revision_text else None
    machine = os.uname().machine if _is_real_root(base) else ""
    return SystemInfo(
        ram_bytes=_ram_bytes(base),
        cgroup_memory_limit_bytes=_cgroup_memory_limit(base),
        cpus=cpus,
        cgroup_cpu_limit=_cgroup_cpu_limit(base),
        clock_mhz=clock_mhz,
        machine=machine,
        model=model,
        pi_revision=revision,
    )


def _board_profile(info: SystemInfo) -> DeviceProfile | None:
    names: list[str] = []
    if info.pi_revision is not None and info.pi_revision.profile_name:
        names.append(info.pi_revision.profile_name)
    model = info.model.lower()
    if "jetson" in model:
        gb = 2 if info.ram_bytes <= 2 * 1024**3 else 4
        names.append(
            f"jetson-orin-nano-{8 if info.ram_bytes > 4 * 1024**3 else 4}gb"
            if "orin" in model
            else f"jetson-nano-{gb}gb"
        )
    for name in names:
        try:
            return get_profile(name)
        except UnknownNameError:
            logger.debug("no registered profile %r", name)
    return None


_RUNTIME_PROBE = (
    "import torch, ondevice, memory, os\n"
    "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))"
)


@lru_cache(maxsize=1)
def measure_runtime_bytes(timeout_s: float = 120.0) -> int | None:
    """Resident size of a fresh interpreter after ``import torch, ondevice, memory`` (bytes), or None.

    The runtime's fixed cost on this machine, measured once per process in a subprocess (a few seconds);
    None where it cannot be measured (no ``/proc``, the probe failed or timed out).
    """
    try:
        done = subprocess.run([sys.executable, "-c", _RUNTIME_PROBE], capture_output=True, text=True,
                              timeout=timeout_s, check=False)  # fmt: skip
        return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def _with_runtime(profile: DeviceProfile, runtime_bytes: int | None) -> DeviceProfile:
    """``profile`` reserving a measured runtime instead of its own figure (when it fits beside the rest)."""
    if runtime_bytes is None or profile.kind is not DeviceKind.LINUX_BOARD:
        return profile
    reserved = profile.reserved_bytes - (profile.runtime_bytes or TORCH_RUNTIME_BYTES) + runtime_bytes
    if not 0 <= reserved < profile.memory_bytes:
        return profile
    measured = f"{profile.description}; runtime measured: {runtime_bytes / MiB:.0f} MiB"
    return replace(profile, reserved_bytes=reserved, runtime_bytes=runtime_bytes, description=measured)


def detect(root: str | os.PathLike[str] = "/", *, measure_runtime: bool = False) -> DeviceProfile:
    """The profile of the machine this runs on (below ``root``).

    A Raspberry Pi or Jetson is recognised from its revision code / device-tree model and its registered
    profile is returned, adjusted when a cgroup limits memory or CPUs (the name then gains ``@cgroup``
    and the OS share leaves the reserve, since the OS lives outside the cgroup). Any other machine gets a
    generic Linux profile built from what was measured. Linux profiles budget the training step's process
    RSS (see ``devices.profiles``); ``measure_runtime=True`` measures the runtime's resident size here
    (:func:`measure_runtime_bytes`, only for ``root="/"``) and reserves it instead of the default.
    """
    runtime = measure_runtime_bytes() if measure_runtime and _is_real_root(Path(root)) else None
    return _with_runtime(_detect(root), runtime)


def _detect(root: str | os.PathLike[str]) -> DeviceProfile:
    info = detect_system(root)
    memory_bytes = info.memory_bytes
    limited = memory_bytes < info.ram_bytes
    cpus = info.usable_cpus
    board = _board_profile(info)
    if board is not None:
        if not limited and cpus >= board.cores:
            return board
        reserved = (
            linux_reserved_bytes(memory_bytes, with_os=not limited) if limited else board.reserved_bytes
        )
        reserved = min(reserved, memory_bytes // 2) if reserved >= memory_bytes else reserved
        return replace(
            board,
            name=f"{board.name}@cgroup",
            memory_bytes=memory_bytes,
            cores=min(cpus, board.cores),
            reserved_bytes=reserved,
            description=f"{board.description}; limited to {memory_bytes / MiB:.0f} MiB and {cpus} CPU(s) "
            "by cgroup/affinity",
        )
    reserved = linux_reserved_bytes(memory_bytes, with_os=not limited)
    if reserved >= memory_bytes:
        reserved = memory_bytes // 2
    what = info.model or info.machine or "unknown machine"
    return DeviceProfile(
        name="generic-linux",
        kind=DeviceKind.LINUX_BOARD,
        memory_bytes=memory_bytes,
        flash_bytes=None,
        cores=cpus,
        clock_mhz=max(1, info.clock_mhz),
        reserved_bytes=reserved,
        description=f"{what}: {memory_bytes / MiB:.0f} MiB"
        + (" (cgroup limit)" if limited else "")
        + f", {cpus} usable CPU(s)",
        runtime_bytes=TORCH_RUNTIME_BYTES,
        process_overhead_bytes=STEP_OVERHEAD_BYTES,
        rss_per_tensor_byte=RSS_PER_TENSOR_BYTE,
    )
