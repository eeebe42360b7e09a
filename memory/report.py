"""The memory report of one training step, as ``memory.measure`` and ``memory.estimate`` return it.

What counts against a :class:`memory.Budget` (:func:`budget_bytes_needed`): the activations kept for
backward, the trainable parameters, their gradients and the optimizer state -- the memory training adds
on top of inference, which TinyTL (Cai et al. 2020, Sec. 2) and tiny-training (Lin et al. 2022, Sec. 3)
budget -- plus the frozen parameters at the budget's ``frozen_param_bits`` when the budget counts them
(a Linux board keeps them in RAM; a microcontroller keeps them, int8, in flash). ``peak_bytes`` is
reported beside it: it adds the transient tensors of this eager implementation (outputs in flight,
gradient buffers), which a compiler such as tiny-training's plans in place.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from memory.budget import Budget, format_bytes
from ondevice.errors import ConfigError

__all__ = [
    "MemoryReport",
    "budget_bytes_needed",
    "device_limits",
    "explain_needed",
    "needed_terms",
    "stored_weight_bytes",
]

_BYTE_FIELDS = (
    "activation_bytes",
    "frozen_param_bytes",
    "peak_bytes",
    "param_bytes",
    "trainable_param_bytes",
    "gradient_bytes",
    "optimizer_state_bytes",
)
_CUDA_FIELDS = (
    "cuda_allocated_bytes",
    "cuda_activation_bytes",
    "cuda_peak_bytes",
    "cuda_reserved_bytes",
    "rss_before_bytes",
    "rss_peak_bytes",
    "step_flops",
)


@dataclass(frozen=True)
class MemoryReport:
    """Memory of one training step (forward, loss, backward, optimizer step).

    Attributes:
        activation_bytes: bytes the model's forward keeps for backward (tensors autograd saves), each
            storage counted once; parameters, buffers and their views are not activations.
        peak_bytes: the most tensor bytes alive at once during the step, counting parameters, buffers,
            inputs, gradients and optimizer state that already existed (see ``memory.measure``).
        param_bytes: bytes of all parameters.
        trainable_param_bytes: bytes of parameters with ``requires_grad``.
        gradient_bytes: bytes of the parameter gradients after backward.
        optimizer_state_bytes: bytes of the optimizer's state after its step.
        modules: per-module breakdown of ``activation_bytes``: qualified module name (``""`` for the
            root) -> bytes kept by tensors saved while that module's own forward ran, in forward order.
            Modules whose forward ran are listed even when they keep nothing.
        source: ``"measured"`` (real tensors) or ``"estimated"`` (fake tensors).
        frozen_param_bytes: bytes of the frozen parameters stored at ``frozen_param_bits`` per element
            (``None`` on construction means their own storage, ``param_bytes - trainable_param_bytes``).
        frozen_param_bits: storage width the frozen parameters are counted at (8 for int8 MCU
            deployment as in TinyTL and tiny-training, 32 for float).
        stock_modules: the part of ``modules`` kept by layers that have no memory-saving op and run on
            stock autograd (``ondevice.ops.unsupported_leaves(model, include_parameterless=True)``), same
            names; empty when every layer has an op.
        cuda_allocated_bytes: on CUDA (``memory.measure`` only; ``None`` elsewhere), the caching
            allocator's ``torch.cuda.memory_allocated()`` before the step: everything held on the device,
            the model and the input included, and any other tensor living there.
        cuda_activation_bytes: on CUDA, how much ``memory_allocated()`` grew over the forward: what the
            forward holds for backward as the allocator sees it (with the output and the allocator's
            rounding of each block to 512 bytes).
        cuda_peak_bytes: on CUDA, ``torch.cuda.max_memory_allocated()`` over the step (its statistics
            reset just before): the device's peak, counted from zero like ``cuda_allocated_bytes``.
        cuda_reserved_bytes: on CUDA, ``torch.cuda.memory_reserved()`` after the step: what the caching
            allocator holds from the driver (allocated blocks plus its cache).
        rss_before_bytes: the process's resident set just before the step (``memory.measure`` on CPU
            and CUDA; ``None`` for estimates): the interpreter, torch, the model and whatever else lives in
            the process.
        rss_peak_bytes: the process's peak resident set during the step (Linux: the kernel's ``VmHWM``,
            reset just before the step; elsewhere the lifetime peak). ``rss_added_bytes`` is the rise. The
            trackers that count tensors run Python on every op, which adds a little of its own; the
            ``bench/memory.py`` RSS columns measure an untracked step in a fresh process.
        step_flops: the FLOPs of the step's matrix products, convolutions and attention (forward,
            backward and any forward that backward runs again, as recomputed blocks do), counted by
            :class:`memory.flops.FlopCount` (``memory.estimate`` only; ``None`` for measurements).
    """

    activation_bytes: int
    peak_bytes: int
    param_bytes: int
    trainable_param_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    modules: dict[str, int] = field(default_factory=dict)
    source: Literal["measured", "estimated"] = "measured"
    frozen_param_bytes: int | None = None
    frozen_param_bits: int = 32
    stock_modules: dict[str, int] = field(default_factory=dict)
    cuda_allocated_bytes: int | None = None
    cuda_activation_bytes: int | None = None
    cuda_peak_bytes: int | None = None
    cuda_reserved_bytes: int | None = None
    rss_before_bytes: int | None = None
    rss_peak_bytes: int | None = None
    step_flops: int | None = None

    def __post_init__(self) -> None:
        if self.frozen_param_bytes is None:
            object.__setattr__(
                self, "frozen_param_bytes", max(0, self.param_bytes - self.trainable_param_bytes)
            )
        if self.frozen_param_bits not in (8, 16, 32):
            raise ConfigError(
                f"MemoryReport.frozen_param_bits must be 8, 16 or 32, got {self.frozen_param_bits!r}"
            )
        for name in _BYTE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"MemoryReport.{name} must be an int >= 0, got {value!r}")
        for name in _CUDA_FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"MemoryReport.{name} must be None or an int >= 0, got {value!r}")
        if self.source not in ("measured", "estimated"):
            raise ConfigError(f"MemoryReport.source must be 'measured' or 'estimated', got {self.source!r}")
        object.__setattr__(self, "modules", {str(k): int(v) for k, v in self.modules.items()})
        object.__setattr__(self, "stock_modules", {str(k): int(v) for k, v in self.stock_modules.items()})
        if any(v < 0 for v in self.stock_modules.values()):
            raise ConfigError(
                f"MemoryReport.stock_modules must map layer names to bytes >= 0, got {self.stock_modules!r}"
            )

    @property
    def on_cuda(self) -> bool:
        """Whether the caching allocator's figures were read (a step measured on a CUDA device)."""
        return self.cuda_peak_bytes is not None

    @property
    def rss_added_bytes(self) -> int | None:
        """How far the process's resident set rose above ``rss_before_bytes`` during the step (or None)."""
        if self.rss_peak_bytes is None or self.rss_before_bytes is None:
            return None
        return max(0, self.rss_peak_bytes - self.rss_before_bytes)

    @property
    def stock_bytes(self) -> int:
        """Activation bytes kept by layers on stock autograd (the sum of ``stock_modules``)."""
        return sum(self.stock_modules.values())

    @property
    def training_state_bytes(self) -> int:
        """Trainable parameters, their gradients and the optimizer state."""
        return self.trainable_param_bytes + self.gradient_bytes + self.optimizer_state_bytes

    def frozen_bytes_at(self, bits: int) -> int:
        """Bytes of the frozen parameters stored at ``bits`` per element instead of ``frozen_param_bits``."""
        return int(self.frozen_param_bytes or 0) * bits // self.frozen_param_bits

    def needed_bytes(self, budget: Budget) -> int:
        """Bytes of this step that count against ``budget`` (see :func:`budget_bytes_needed`)."""
        return budget_bytes_needed(self, budget)

    def fits(self, budget: Budget) -> bool:
        """Whether this step fits in ``budget``."""
        return budget.fits(budget_bytes_needed(self, budget))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``MemoryReport.from_dict`` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryReport:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)

    def to_markdown(self, *, top: int | None = 20) -> str:
        """A Markdown summary table, then the ``top`` modules keeping the most bytes (all if ``None``)."""
        rows = [
            ("activations saved for backward", self.activation_bytes),
            ("peak during the step", self.peak_bytes),
            ("parameters", self.param_bytes),
            ("trainable parameters", self.trainable_param_bytes),
            ("gradients", self.gradient_bytes),
            ("optimizer state", self.optimizer_state_bytes),
            (f"frozen parameters at {self.frozen_param_bits} bit", int(self.frozen_param_bytes or 0)),
        ]
        allocator = [
            ("CUDA allocator: allocated before the step", self.cuda_allocated_bytes),
            ("CUDA allocator: growth over the forward", self.cuda_activation_bytes),
            ("CUDA allocator: peak of the step", self.cuda_peak_bytes),
            ("CUDA allocator: reserved after the step", self.cuda_reserved_bytes),
        ]
        allocator += [
            ("process RSS before the step", self.rss_before_bytes),
            ("process peak RSS during the step", self.rss_peak_bytes),
            ("process RSS added by the step", self.rss_added_bytes),
        ]
        rows += [(what, value) for what, value in allocator if value is not None]
        lines = [f"Memory of one training step ({self.source})", "", "| what | bytes | size |"]
        lines.append("|---|---:|---:|")
        lines += [f"| {what} | {value} | {format_bytes(value)} |" for what, value in rows]
        if self.step_flops is not None:
            lines.append(f"| compute of the step (matmul/conv FLOPs) | {self.step_flops} | "
                         f"{self.step_flops / 1e9:.3g} GFLOP |")  # fmt: skip
        lines += [
            "",
            "A budget is compared with activations + trainable parameters + gradients + optimizer state "
            "(+ frozen parameters when it counts them), not with the peak, which adds this eager step's "
            "transient tensors and every parameter.",
        ]
        if self.stock_modules:
            names = [name or "<root>" for name in self.stock_modules]
            listed = ", ".join(names[:5]) + (f", ... {len(names) - 5} more" if len(names) > 5 else "")
            lines += [
                "",
                f"layers on stock autograd (no memory-saving op): {self.stock_bytes} bytes in "
                f"{len(names)} layer{'s' if len(names) != 1 else ''} "
                f"({format_bytes(self.stock_bytes)}; {listed})",
            ]
        keeping = sorted(((n, b) for n, b in self.modules.items() if b > 0), key=lambda nb: -nb[1])
        if keeping:
            shown = keeping if top is None else keeping[:top]
            lines += ["", "| module | activation bytes | share |", "|---|---:|---:|"]
            total = max(self.activation_bytes, 1)
            lines += [f"| {name or '<root>'} | {b} | {100 * b / total:.1f} % |" for name, b in shown]
            if len(shown) < len(keeping):
                lines.append(f"| ... {len(keeping) - len(shown)} more | | |")
        return "\n".join(lines) + "\n"


def needed_terms(report: MemoryReport, budget: Budget) -> dict[str, int]:
    """The terms of :func:`budget_bytes_needed`, named as reports print them, in the order they add up.

    A process budget (``budget.counts_process``) adds up the eager step's tensor peak (at least the tensor
    terms), the allocator's share on top of it and the step's fixed overhead beyond tensors.
    """
    terms = _tensor_terms(report, budget)
    if budget.process_overhead_bytes is None:
        return terms
    tensors = max(report.peak_bytes, sum(terms.values()))
    share = budget.rss_per_tensor_byte - 1
    return {
        "tensor peak of the eager step": tensors,
        f"allocator share ({100 * share:.0f} % of it)": math.ceil(share * tensors),
        "fixed step overhead (kernel code, modules, allocator)": budget.process_overhead_bytes,
    }


def _tensor_terms(report: MemoryReport, budget: Budget) -> dict[str, int]:
    terms = {
        "activations kept for backward": report.activation_bytes,
        "trainable parameters": report.trainable_param_bytes,
        "gradients": report.gradient_bytes,
        "optimizer state": report.optimizer_state_bytes,
    }
    if budget.count_frozen_params:
        terms[f"frozen parameters at {budget.frozen_param_bits} bit"] = report.frozen_bytes_at(
            budget.frozen_param_bits
        )
    return terms


def budget_bytes_needed(report: MemoryReport, budget: Budget) -> int:
    """The bytes of ``report`` that count against ``budget``.

    ``activation_bytes + trainable_param_bytes + gradient_bytes + optimizer_state_bytes``, plus the
    frozen parameters at ``budget.frozen_param_bits`` when ``budget.count_frozen_params`` is set. This is
    TinyTL's accounting (Cai et al. 2020, Sec. 2 and Fig. 1: activations, trainable parameters at 32 bit,
    frozen parameters at 8 bit), with gradients and optimizer state made explicit as tiny-training
    (Lin et al. 2022, Sec. 3) keeps them in SRAM too.

    A process budget (``budget.counts_process``, e.g. a Linux board's) compares the resident memory the
    eager step adds instead: ``max(peak_bytes, the sum above) * rss_per_tensor_byte +
    process_overhead_bytes`` (see :func:`needed_terms` and :mod:`memory.process`).
    """
    return sum(needed_terms(report, budget).values())


def stored_weight_bytes(report: MemoryReport, budget: Budget) -> int:
    """Bytes of weights the device stores: frozen ones at the budget's width, trainable ones as they are."""
    return report.frozen_bytes_at(budget.frozen_param_bits) + report.trainable_param_bytes


def device_limits(report: MemoryReport, budget: Budget) -> list[str]:
    """Figures of ``report`` that the device behind ``budget`` cannot hold, one sentence each.

    Checked when the budget knows the device (``Budget.from_profile``): the weights to store (frozen at
    ``frozen_param_bits``, trainable as they are) against ``flash_bytes``, and the eager peak against
    ``memory_bytes``. An empty list means nothing known was exceeded.
    """
    where = f" of {budget.name}" if budget.name else ""
    found = []
    stored = stored_weight_bytes(report, budget)
    if budget.flash_bytes is not None and stored > budget.flash_bytes:
        found.append(
            f"the weights to store ({format_bytes(stored)}: frozen at {budget.frozen_param_bits} bit, "
            f"trainable at full width) exceed the {format_bytes(budget.flash_bytes)} flash{where}; choose a "
            f"smaller model (fewer channels or layers) or store frozen weights at fewer bits"
        )
    if budget.memory_bytes is not None and report.peak_bytes > budget.memory_bytes:
        found.append(
            f"the eager peak ({format_bytes(report.peak_bytes)}) exceeds the "
            f"{format_bytes(budget.memory_bytes)} memory{where}: eager PyTorch cannot run this step "
            f"there; only a runtime that plans tensors in place (as tiny-training's compiler does) can, "
            f"and the requirement above is what it needs"
        )
    return found


def explain_needed(report: MemoryReport, budget: Budget) -> str:
    """Markdown: which figure is compared with ``budget`` and why, what is not, and what the device lacks."""
    needed = budget_bytes_needed(report, budget)
    terms = " + ".join(f"{what} {format_bytes(b)}" for what, b in needed_terms(report, budget).items())
    share = 100 * needed / budget.total_bytes
    if budget.counts_process:
        paragraphs = [
            f"**Requirement (compared with the budget): {format_bytes(needed)} of "
            f"{format_bytes(budget.total_bytes)} ({share:.1f} %)** = {terms}. "
            f"This is the resident memory the eager training step adds to its process above "
            f"`import torch, ondevice` (peak RSS), not tensor bytes alone: the runtime itself is reserved "
            f"outside the budget, and the figures assume the SDK's process policy "
            f"(`memory.process.lean_process()`, a trim after each step, an optimizer that does not import "
            f"torch._dynamo).",
        ]
    else:
        paragraphs = [
            f"**Requirement (compared with the budget): {format_bytes(needed)} of "
            f"{format_bytes(budget.total_bytes)} ({share:.1f} %)** = {terms}. "
            f"This is the memory training adds to inference, which must fit in the training budget "
            f"(TinyTL's and tiny-training's accounting).",
        ]
    frozen = report.frozen_bytes_at(budget.frozen_param_bits)
    if not budget.count_frozen_params:
        place = "flash" if budget.flash_bytes is not None else "storage outside this budget"
        paragraphs.append(
            f"Frozen weights are not counted: at {budget.frozen_param_bits} bit they take "
            f"{format_bytes(frozen)}, kept in {place}."
        )
    if not budget.counts_process:
        paragraphs.append(
            f"Not the requirement: the peak of {format_bytes(report.peak_bytes)} is what this eager PyTorch "
            f"step holds at once (every parameter at its own width, the input, transient outputs and "
            f"gradient buffers); it is reported for running the step here, not compared with the budget."
        )
    limits = device_limits(report, budget)
    if limits:
        paragraphs.append("**Exceeds the device:**\n\n" + "\n".join(f"- {item}" for item in limits))
    return "\n\n".join(paragraphs) + "\n"
