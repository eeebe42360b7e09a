"""Stand-ins for tensors whose values a backward kernel does not read, only their shape.

ATen's backward kernels take the forward input even when they only need its shape (the input gradient
of a convolution or a pooling layer), and they make it contiguous first, so a zero-stride ``expand`` would
be copied in full. A placeholder is an *uninitialised* contiguous tensor instead: its pages are never
written or read, so it occupies address space but no physical memory. ``memory``'s live-tensor tracker
asks :func:`allocating_placeholder` and does not count it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from torch import Tensor

__all__ = ["allocating_placeholder", "shape_placeholder"]

_state = threading.local()


def allocating_placeholder() -> bool:
    """Whether the current thread is allocating a placeholder (its tensors are not real memory)."""
    return getattr(_state, "active", False)


def shape_placeholder(shape: Sequence[int], like: Tensor) -> Tensor:
    """An uninitialised contiguous tensor of ``shape`` with ``like``'s dtype and device."""
    _state.active = True
    try:
        return like.new_empty(tuple(shape))
    finally:
        _state.active = False
