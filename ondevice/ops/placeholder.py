"""Stand-ins for tensors whose values a backward kernel does not read, only their shape.

ATen's backward kernels take the forward input even when they only need its shape (the input gradient
of a convolution or a pooling layer), and they make it contiguous first, so a zero-stride ``expand`` would
be copied in full. A placeholder is a dense tensor whose pages are never written, so it occupies address
space but no physical memory (on the CPU a fresh anonymous mapping, which reads as zeros). It takes the
memory format of the input it stands for (:func:`memory_format_of`): the kernels choose their algorithm
and the layout of the gradient they return from it (cuDNN in particular), so a channels_last input must
get a channels_last stand-in, as stock autograd hands them the input itself. ``memory``'s live-tensor tracker
asks :func:`allocating_placeholder` and does not count it.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["allocating_placeholder", "memory_format_of", "shape_placeholder"]

_state = threading.local()


def allocating_placeholder() -> bool:
    """Whether the current thread is allocating a placeholder (its tensors are not real memory)."""
    return getattr(_state, "active", False)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """``channels_last`` (``channels_last_3d``) for an input dense in that format only, else contiguous."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _zero_pages(shape: tuple[int, ...], like: Tensor, memory_format: torch.memory_format) -> Tensor:
    """A CPU tensor over a fresh anonymous mapping: it reads as zeros, and untouched pages map the kernel's
    shared zero page, so it still occupies no physical memory."""
    layout = torch.empty(shape, dtype=like.dtype, device="meta", memory_format=memory_format)
    nbytes = max(1, layout.untyped_storage().nbytes())
    flat = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=like.dtype, count=nbytes // like.element_size())
    return flat.as_strided(shape, layout.stride())


def shape_placeholder(
    shape: Sequence[int], like: Tensor, memory_format: torch.memory_format = torch.contiguous_format
) -> Tensor:
    """A tensor of ``shape`` in ``memory_format``, with ``like``'s dtype and device, that holds no physical
    memory. On the CPU it reads as zeros: some kernels read it although no gradient asked for needs it (a
    oneDNN convolution computes the weight's gradient with the bias's), and leftover memory could hold
    denormal floats, which make such a kernel several times slower. Elsewhere it is uninitialised."""
    _state.active = True
    try:
        dims = tuple(shape)
        if like.device.type == "cpu" and not isinstance(like, FakeTensor) and like.dtype.is_floating_point:
            return _zero_pages(dims, like, memory_format)
        return torch.empty(dims, dtype=like.dtype, device=like.device, memory_format=memory_format)
    finally:
        _state.active = False
