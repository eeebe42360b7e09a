"""Measure the memory of one real training step: activations kept for backward, peak, state.

Two trackers do the counting; both look only at tensor *metadata* (storage identity and size), never at
values, so they work unchanged on fake or meta tensors (``memory.estimate`` reuses them):

* :class:`SavedTensorTracker` sees every tensor autograd saves for backward through
  ``torch.autograd.graph.saved_tensors_hooks`` and counts each underlying storage once (views share
  their base's storage), skipping parameters, buffers and their views. A storage counts while it is
  alive, so a branch whose graph is dropped before backward drops out. Forward pre/post hooks, removed
  afterwards, attribute each storage to the module whose own forward was running when it was first saved.
  Tensors kept on ``ctx`` outside ``save_for_backward`` are invisible to autograd's hooks (the ops in
  ``ondevice.ops`` save everything through ``save_for_backward``).
* :class:`LiveTensorTracker` is a ``TorchDispatchMode`` that sees the output of every ATen op in
  forward, backward and the optimizer step and keeps the bytes of live storages, freeing them through a
  weakref finalizer when the storage dies (storages keep their Python object while alive, so the finalizer
  fires exactly at the free). Its peak is exact at the level of tensors, which is what a planner can
  predict. Placeholders (``ondevice.ops.placeholder``: uninitialised tensors a backward kernel needs only
  for their shape, which never get physical pages) are not counted; memory an ATen kernel allocates
  internally for itself (e.g. an im2col or oneDNN workspace) and
  allocator overhead are not tensors and are not counted. ``torch.profiler``'s memory events would see
  those but cannot run on fake tensors.

On a CUDA device ``measure`` also reads the caching allocator, which counts everything, workspaces and
block rounding included: ``torch.cuda.memory_allocated()`` before the step and after the forward (the
growth is what the forward holds, as the allocator sees it), ``torch.cuda.max_memory_allocated()`` over the
step (its peak statistics are reset first) and ``torch.cuda.memory_reserved()`` after it, synchronising
the device before each reading. The first CUDA step of a process also allocates library workspaces
(cuBLAS, cuDNN), which then count as growth: measure after one warm-up step for steady-state figures.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from memory.process import RssReading, trim
from memory.report import MemoryReport
from ondevice._kept import storage_key
from ondevice.errors import ConfigError
from ondevice.ops.convert import unsupported_leaves
from ondevice.ops.placeholder import allocating_placeholder
from ondevice.quantize import int8_saved_weights, quantized_layers

__all__ = [
    "LiveTensorTracker",
    "SavedTensorTracker",
    "check_trainable",
    "default_loss",
    "distinct_storage_bytes",
    "frozen_bytes",
    "measure",
    "stock_autograd_modules",
    "storage_key",
    "training_step_report",
]

logger = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], Tensor]


def distinct_storage_bytes(tensors: Iterable[Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a storage shared by views counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor):
            key = storage_key(t)
            if key is not None:
                seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


class SavedTensorTracker:
    """Counts the bytes autograd saves for backward, each storage once, per module.

    Args:
        exclude: tensors whose storages are not activations (parameters, buffers); their views are
            excluded too.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._excluded = {k for k in (storage_key(t) for t in exclude) if k is not None}
        self._saved: dict[int, tuple[int, str]] = {}
        self._stack: list[str] = [""]
        self._ran: dict[str, None] = {}

    def _pack(self, t: Tensor) -> Tensor:
        key = storage_key(t)
        if key is not None and key not in self._excluded and key not in self._saved:
            storage = t.untyped_storage()
            self._saved[key] = (storage.nbytes(), self._stack[-1])
            weakref.finalize(storage, self._saved.pop, key, None)
        # A detached alias: returning ``t`` itself would make a graph that saves its own output hold a
        # reference cycle through C++ that the garbage collector cannot break.
        return t.detach()

    @staticmethod
    def _unpack(t: Tensor) -> Tensor:
        return t

    @contextmanager
    def track(self, model: nn.Module | None = None) -> Iterator[SavedTensorTracker]:
        """Count saved tensors inside the block; attribute them to ``model``'s submodules if given."""
        with self.attributing(model), torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self

    @contextmanager
    def attributing(self, model: nn.Module | None) -> Iterator[None]:
        """Inside it, saved tensors are attributed to the ``model`` submodule whose forward is running.

        The forward hooks this registers can change how a layer runs (a fused Sequential runs unfused
        under hooks), so a step that runs forwards again in backward (recomputed blocks) must keep them
        registered until its backward is done, for the recomputation to run as the forward did."""
        handles = []
        if model is not None:
            for name, module in model.named_modules():
                handles.append(module.register_forward_pre_hook(self._enter(name)))
                handles.append(module.register_forward_hook(self._leave(name), always_call=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._stack.append(name)
            self._ran.setdefault(name, None)

        return hook

    def _leave(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if len(self._stack) > 1 and self._stack[-1] == name:
                self._stack.pop()

        return hook

    @property
    def saved_bytes(self) -> int:
        """Bytes of the saved storages still alive."""
        return sum(nbytes for nbytes, _ in list(self._saved.values()))

    def by_module(self) -> dict[str, int]:
        """Saved bytes still alive per module (modules whose forward ran, in forward order)."""
        result = dict.fromkeys(self._ran, 0)
        for nbytes, name in list(self._saved.values()):
            result[name] = result.get(name, 0) + nbytes
        return result


class LiveTensorTracker(TorchDispatchMode):
    """Tracks the bytes of live tensor storages produced by ATen ops while active, and their peak.

    Args:
        known: tensors that exist before tracking starts (parameters, inputs, ...); their storages are
            never counted as new, so ``peak_bytes`` is the peak *on top of* them.
    """

    def __init__(self, known: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self._known = {k for k in (storage_key(t) for t in known) if k is not None}
        self._live: dict[int, int] = {}
        self.current_bytes = 0
        self.peak_bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._see(t)
        return out

    def _see(self, t: Tensor) -> None:
        key = storage_key(t)
        if key is None or key in self._known:
            return
        if allocating_placeholder():  # uninitialised, never touched: no physical memory
            # Forget the key when the placeholder dies: the next storage may reuse its address.
            self._known.add(key)
            weakref.finalize(t.untyped_storage(), self._known.discard, key)
            return
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        old = self._live.get(key)
        if old is None:
            weakref.finalize(storage, self._free, key)
        elif old == nbytes:
            return
        self._live[key] = nbytes
        self.current_bytes += nbytes - (old or 0)
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def _free(self, key: int) -> None:
        self.current_bytes -= self._live.pop(key, 0)


def default_loss(output: Tensor, target: Tensor | None) -> Tensor:
    """Cross-entropy for class scores (``target`` defaults to class 0), MSE for a float target."""
    if not isinstance(output, Tensor):
        raise ConfigError(
            f"the model returned {type(output).__name__}, not a tensor; pass loss_fn=... to measure()"
        )
    if target is None:
        if output.dim() < 2:
            return output.float().pow(2).mean()
        target = torch.zeros((output.shape[0], *output.shape[2:]), dtype=torch.long, device=output.device)
    if target.is_floating_point():
        return F.mse_loss(output, target)
    return F.cross_entropy(output, target)


def _tensors(obj: Any) -> list[Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, Tensor)]


def check_trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that require grad; ConfigError if there are none."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(
            f"no parameter of {type(model).__name__} requires grad, so there is no training step to "
            "measure; unfreeze some parameters (e.g. with ondevice.prepare) first"
        )
    return trainable


def frozen_bytes(params: Iterable[Tensor], bits: int) -> int:
    """Bytes of the frozen tensors among ``params`` stored at ``bits`` per element (TinyTL, Sec. 4: int8).

    At ``bits=32`` (or the tensors' own width) this is their storage; each storage counts once.
    """
    seen: dict[int, int] = {}
    for p in params:
        if not p.requires_grad:
            key = storage_key(p)
            if key is not None:
                width = bits if bits < 8 * p.element_size() else 8 * p.element_size()
                seen[key] = (p.untyped_storage().nbytes() // p.element_size()) * width // 8
    return sum(seen.values())


def stock_autograd_modules(model: nn.Module, modules: dict[str, int]) -> dict[str, int]:
    """The entries of a per-module breakdown of ``model`` that belong to layers on stock autograd.

    Those are the layers :func:`ondevice.ops.unsupported_leaves` lists (with parameter-free ones that may
    keep tensors): no memory-saving op covers them. ``modules`` is named as ``model.named_modules()``
    names them (a ``PreparedModel``'s layers as ``model.<name>``), and so is the result.
    """
    stock = unsupported_leaves(model, include_parameterless=True)
    return {name: nbytes for name, nbytes in modules.items() if name in stock}


class _AllocatorReading:
    """The caching allocator's figures over one step on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        self.allocated_bytes = int(torch.cuda.memory_allocated(device))
        self.activation_bytes = 0
        self.peak_bytes = self.allocated_bytes
        self.reserved_bytes = 0

    def after_forward(self) -> None:
        torch.cuda.synchronize(self.device)
        self.activation_bytes = max(0, int(torch.cuda.memory_allocated(self.device)) - self.allocated_bytes)

    def after_step(self) -> None:
        torch.cuda.synchronize(self.device)
        self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        self.reserved_bytes = int(torch.cuda.memory_reserved(self.device))


def _cuda_device(model: nn.Module, inputs: tuple[Any, ...]) -> torch.device | None:
    """The CUDA device the step runs on (its first input's, else its first parameter's), or None."""
    first = next(iter([*_tensors(inputs), *model.parameters()]), None)
    return first.device if first is not None and first.device.type == "cuda" else None


def training_step_report(
    model: nn.Module,
    inputs: tuple[Any, ...],
    *,
    target: Tensor | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: LossFn | None = None,
    source: Literal["measured", "estimated"] = "measured",
    frozen_param_bits: int = 32,
    read_allocator: bool = False,
    int8_hooks: bool = False,
) -> MemoryReport:
    """Run forward, loss, backward and optimizer step once and report the memory (the shared core).

    ``measure`` calls it on real tensors; ``memory.estimate`` on fake ones, inside a ``FakeTensorMode``.
    The model's gradients must be ``None`` on entry; gradients, optimizer state and buffers are left as
    the step leaves them (the callers put them back or throw the model away). With ``read_allocator``
    and a step on a CUDA device, the caching allocator's figures are read too (real tensors only).
    ``int8_hooks`` runs the forward under :func:`ondevice.quantize.int8_saved_weights`, as a
    ``PreparedModel`` with int8 frozen weights runs it (for a bare module quantised by ``estimate``).

    A model holding frozen weights in int8 reports them as held: ``frozen_param_bytes`` is the storage of
    its frozen parameters (int8 weights, their float32 scales, float norms) and ``frozen_param_bits`` 8,
    whatever ``frozen_param_bits`` asks.
    """
    params = list(model.parameters())
    trainable = check_trainable(model)
    buffers = list(model.buffers())
    opt = optimizer if optimizer is not None else torch.optim.SGD(trainable, lr=0.0, momentum=0.9)
    existing_state = _tensors(list(opt.state.values()))
    known = [*params, *buffers, *existing_state, *_tensors(inputs), *_tensors(target)]
    baseline_bytes = distinct_storage_bytes(known)
    saved = SavedTensorTracker(exclude=[*params, *buffers])
    live = LiveTensorTracker(known)
    loss = loss_fn if loss_fn is not None else default_loss
    cuda = _cuda_device(model, inputs) if read_allocator else None
    allocator = _AllocatorReading(cuda) if cuda is not None else None
    with live:
        with saved.attributing(model):  # through backward: recomputed blocks run their forward again there
            with saved.track(), int8_saved_weights() if int8_hooks else nullcontext():
                output = model(*inputs)
            if allocator is not None:
                allocator.after_forward()
            activation_bytes = saved.saved_bytes
            modules = saved.by_module()
            loss(output, target).backward()
            del output
        gradient_bytes = distinct_storage_bytes(p.grad for p in trainable)
        opt.step()
        optimizer_state_bytes = distinct_storage_bytes(_tensors(list(opt.state.values())))
        if allocator is not None:
            allocator.after_step()
    if quantized_layers(model):  # int8 storage is what it holds; scales and norms stay float32
        frozen_param_bits = 8
        frozen_param_bytes = frozen_bytes(params, 32)
    else:
        frozen_param_bytes = frozen_bytes(params, frozen_param_bits)
    return MemoryReport(
        activation_bytes=activation_bytes,
        peak_bytes=baseline_bytes + live.peak_bytes,
        param_bytes=distinct_storage_bytes(params),
        trainable_param_bytes=distinct_storage_bytes(trainable),
        gradient_bytes=gradient_bytes,
        optimizer_state_bytes=optimizer_state_bytes,
        modules=modules,
        source=source,
        frozen_param_bytes=frozen_param_bytes,
        frozen_param_bits=frozen_param_bits,
        stock_modules=stock_autograd_modules(model, modules),
        cuda_allocated_bytes=None if allocator is None else allocator.allocated_bytes,
        cuda_activation_bytes=None if allocator is None else allocator.activation_bytes,
        cuda_peak_bytes=None if allocator is None else allocator.peak_bytes,
        cuda_reserved_bytes=None if allocator is None else allocator.reserved_bytes,
    )


def measure(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...],
    *,
    target: Tensor | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: LossFn | None = None,
) -> MemoryReport:
    """Run one real training step of ``model`` on ``example_input`` and report its memory.

    The step is forward (in the model's current train/eval mode), loss, backward and optimizer step,
    starting from no gradients (as after ``zero_grad(set_to_none=True)``). ``activation_bytes`` is what
    the *model's* forward saves for backward (the loss's own saved tensors count only towards the peak).
    ``peak_bytes`` is the peak of live tensor bytes over the step plus the parameters, buffers, inputs,
    target and existing optimizer state (see the module docstring for what it leaves out).

    The default optimizer is ``SGD(lr=0, momentum=0.9)`` over the parameters that require grad: it holds
    the state a momentum optimizer holds while leaving the weights unchanged. A given ``optimizer`` steps
    for real. Gradients and buffers (e.g. BatchNorm running statistics updated in train mode) are put
    back afterwards.

    On a CUDA device the report also carries the caching allocator's figures (``cuda_*`` fields; see
    the module docstring); this resets the device's peak-memory statistics. On every device it carries
    the process's resident set before the step and its peak during it (``rss_before_bytes``,
    ``rss_peak_bytes``; on Linux the kernel's peak mark is reset for the step, after the free heap is
    returned with ``malloc_trim``, so that the rise counts the pages the step needs).

    Args:
        model: the model, prepared as it will train (frozen parameters have ``requires_grad=False``).
        example_input: one batch, or a tuple of positional inputs.
        target: labels for the loss; by default class 0 for every sample (cross-entropy).
        optimizer: the optimizer to step; by default the zero-lr SGD above.
        loss_fn: ``loss_fn(output, target) -> scalar``; by default :func:`default_loss`.

    Raises:
        ConfigError: no parameter requires grad, or the output is not a tensor and no ``loss_fn`` is given.
    """
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    params = list(model.parameters())
    check_trainable(model)
    buffers = list(model.buffers())
    stashed_grads = [p.grad for p in params]
    stashed_buffers = [b.detach().clone() for b in buffers]
    for p in params:
        p.grad = None
    try:
        trim()  # free heap the step could reuse without a new page would hide what it needs
        rss = RssReading()
        report = training_step_report(
            model, inputs, target=target, optimizer=optimizer, loss_fn=loss_fn, source="measured",
            read_allocator=True,
        )
        rss.stop()
        report = dataclasses.replace(report, rss_before_bytes=rss.before_bytes, rss_peak_bytes=rss.peak_bytes)
    finally:
        with torch.no_grad():
            for b, old in zip(buffers, stashed_buffers, strict=True):
                b.copy_(old)
        for p, grad in zip(params, stashed_grads, strict=True):
            p.grad = grad
    logger.debug("measured %s: %d activation bytes, %d peak bytes", type(model).__name__,
                 report.activation_bytes, report.peak_bytes)  # fmt: skip
    return report
