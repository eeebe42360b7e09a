"""What the process holds, not only its tensors: resident memory (RSS) readings and the SDK's lean policy.

A device does not see tensors, it sees its process. Three things lie between ``memory.measure``'s exact
tensor figures and the process's resident set (measured on MobileNetV2-w0.35 @128 px, batch 8,
bias-only, one thread, ``bench/memory.py``):

* **Code pages.** The first forward and backward page in the kernels they run from ``libtorch_cpu.so``
  (and oneDNN's, when convolutions go through it): about 17 MiB on the native path, 29 MiB with oneDNN.
  They are file-backed (``RssFile``), paid once per process, and count in the peak RSS.
* **The allocator.** glibc's ``malloc`` serves blocks above ``M_MMAP_THRESHOLD`` (128 KiB) with
  ``mmap`` and gives them back on ``free`` -- but every such free *raises* the threshold (up to 32 MiB),
  so after the first step activation-sized blocks come from the heap, are kept after they are freed and
  fragment it. Fixing the threshold (:func:`set_mmap_threshold`, or ``MALLOC_MMAP_THRESHOLD_=131072`` in
  the environment) keeps it where it starts: freed activations go back to the kernel at once.
* **Backend workspaces.** oneDNN (``torch.backends.mkldnn``) reorders weights and inputs into blocked
  layouts for every convolution; a frozen layer has nothing to gain from them on small inputs.

:func:`lean_process` applies the SDK's policy (fixed mmap threshold, native convolutions, a
:func:`trim` after each step); :class:`RssReading` and the module-level readers report RSS for
``memory.measure`` and the benchmark. Everything here is Linux/glibc specific and degrades to ``None`` or
``False`` elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import torch

__all__ = [
    "DEFAULT_MMAP_THRESHOLD_BYTES",
    "RSS_PER_TENSOR_BYTE",
    "STEP_OVERHEAD_BYTES",
    "LeanSettings",
    "RssReading",
    "current_rss_bytes",
    "lean_process",
    "peak_rss_bytes",
    "reset_peak_rss",
    "rss_parts",
    "set_mmap_threshold",
    "trim",
]

STEP_OVERHEAD_BYTES = 64 * 1024 * 1024
"""Resident memory a training step's process adds beyond its tensors, once: kernel code paged in by the
first forward and backward (17 MiB on the native convolution path, more when weights train), the model's
own modules, backend workspaces the tensor figures do not see and allocator slack. A default with margin,
from fresh-subprocess runs under :func:`lean_process` (x86-64, torch 2.13, one thread,
``tests/test_rss_plan.py``): on MobileNetV2-w0.35, peak RSS added minus 1.1 x the tensor peak is 17-20 MiB
training every weight (64-96 px, batch 4-8), 21-28 MiB sparse (96 px), 27 MiB bias-only (96-128 px) and
32 MiB bias-only at 160 px on one machine; another machine of the same kind measured up to 17 MiB more. The
fixed part belongs to the machine (its kernel, libraries and CPU) more than to the model: measure your
own step with ``bench/memory.py`` before trusting a plan near the limit."""
RSS_PER_TENSOR_BYTE = 1.1
"""Resident bytes per byte of tensor peak under :func:`lean_process` (measured 0.7-1.0, with margin)."""
DEFAULT_MMAP_THRESHOLD_BYTES = 128 * 1024
"""glibc's initial ``M_MMAP_THRESHOLD``; fixing it there stops the dynamic rise that keeps freed blocks."""
_M_MMAP_THRESHOLD = -3  # <malloc.h>


@lru_cache(maxsize=1)
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:  # pragma: no cover - no C library to load
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """The process's resident set now (``/proc/self/statm``; ``ru_maxrss`` where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        return peak_rss_bytes()


def rss_parts() -> dict[str, int]:
    """Resident memory by kind (Linux): ``anon`` (heap, tensors), ``file`` (code, mapped files), ``shmem``."""
    parts = {name: _status_kib(key) for name, key in (("anon", "RssAnon"), ("file", "RssFile"),
                                                       ("shmem", "RssShmem"))}  # fmt: skip
    return {name: value for name, value in parts.items() if value is not None}


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ``clear_refs`` 5); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak RSS: ``VmHWM`` (since the last :func:`reset_peak_rss`), else ``ru_maxrss``."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def trim() -> bool:
    """Give free heap memory back to the kernel (glibc ``malloc_trim(0)``); False where there is none."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def set_mmap_threshold(nbytes: int = DEFAULT_MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's ``M_MMAP_THRESHOLD`` (which also stops its dynamic rise); False where impossible.

    Same effect as ``MALLOC_MMAP_THRESHOLD_=<nbytes>`` in the environment, but settable after start-up.
    """
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)) == 1)


@dataclass(frozen=True)
class LeanSettings:
    """What :func:`lean_process` applied (JSON-ready, for reports)."""

    mmap_threshold_bytes: int | None
    mkldnn_enabled: bool
    threads: int
    trim_after_step: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lean_process(
    *, mmap_threshold_bytes: int | None = DEFAULT_MMAP_THRESHOLD_BYTES, mkldnn: bool = False,
    threads: int | None = None,
) -> LeanSettings:  # fmt: skip
    """Apply the SDK's process policy for on-device training; returns what was applied.

    * fix glibc's mmap threshold (``None`` leaves the allocator alone): activations freed after backward
      go back to the kernel instead of fragmenting the heap;
    * ``torch.backends.mkldnn.enabled = mkldnn``: with oneDNN off, convolutions run on ATen's native
      kernels, which need no blocked-layout reorders or oneDNN code pages (for small frozen layers at
      batch 8 they are no slower on one thread; measure your model with ``bench/memory.py``);
    * ``torch.set_num_threads(threads)`` when given: every extra intra-op thread gets its own malloc arena
      and per-thread buffers.

    Call :func:`trim` after each training step to return the rest of the freed heap. These are process-wide
    settings; call it once, before the first step.
    """
    applied = set_mmap_threshold(mmap_threshold_bytes) if mmap_threshold_bytes is not None else False
    torch.backends.mkldnn.enabled = bool(mkldnn)  # type: ignore[assignment]  # a ContextProp setter
    if threads is not None:
        torch.set_num_threads(int(threads))
    return LeanSettings(
        mmap_threshold_bytes=int(mmap_threshold_bytes) if applied and mmap_threshold_bytes else None,
        mkldnn_enabled=bool(torch.backends.mkldnn.enabled),
        threads=torch.get_num_threads(),
        trim_after_step=_libc() is not None,
    )


class RssReading:
    """Resident memory over a block: construct before it, call :meth:`stop` after it.

    ``peak_bytes`` is the process's peak RSS during the block (exact on Linux, where the kernel's mark is
    reset at the start; elsewhere the lifetime peak), ``before_bytes`` the RSS at the start.
    """

    def __init__(self) -> None:
        self._reset = reset_peak_rss()
        self.before_bytes = current_rss_bytes()
        self.peak_bytes = self.before_bytes
        self.after_bytes = self.before_bytes

    def stop(self) -> RssReading:
        self.after_bytes = current_rss_bytes()
        self.peak_bytes = max(peak_rss_bytes(), self.before_bytes, self.after_bytes)
        return self

    @property
    def exact(self) -> bool:
        """Whether ``peak_bytes`` covers the block only (the kernel's peak mark could be reset)."""
        return self._reset
