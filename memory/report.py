"""The memory report of one training step, as ``memory.measure`` (and later ``memory.estimate``) return it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from memory.budget import format_bytes
from ondevice.errors import ConfigError

__all__ = ["MemoryReport"]

_BYTE_FIELDS = (
    "activation_bytes",
    "peak_bytes",
    "param_bytes",
    "trainable_param_bytes",
    "gradient_bytes",
    "optimizer_state_bytes",
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
    """

    activation_bytes: int
    peak_bytes: int
    param_bytes: int
    trainable_param_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    modules: dict[str, int] = field(default_factory=dict)
    source: Literal["measured", "estimated"] = "measured"

    def __post_init__(self) -> None:
        for name in _BYTE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"MemoryReport.{name} must be an int >= 0, got {value!r}")
        if self.source not in ("measured", "estimated"):
            raise ConfigError(f"MemoryReport.source must be 'measured' or 'estimated', got {self.source!r}")
        object.__setattr__(self, "modules", {str(k): int(v) for k, v in self.modules.items()})

    @property
    def training_state_bytes(self) -> int:
        """Trainable parameters, their gradients and the optimizer state."""
        return self.trainable_param_bytes + self.gradient_bytes + self.optimizer_state_bytes

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
        ]
        lines = [f"Memory of one training step ({self.source})", "", "| what | bytes | size |"]
        lines.append("|---|---:|---:|")
        lines += [f"| {what} | {value} | {format_bytes(value)} |" for what, value in rows]
        keeping = sorted(((n, b) for n, b in self.modules.items() if b > 0), key=lambda nb: -nb[1])
        if keeping:
            shown = keeping if top is None else keeping[:top]
            lines += ["", "| module | activation bytes | share |", "|---|---:|---:|"]
            total = max(self.activation_bytes, 1)
            lines += [f"| {name or '<root>'} | {b} | {100 * b / total:.1f} % |" for name, b in shown]
            if len(shown) < len(keeping):
                lines.append(f"| ... {len(keeping) - len(shown)} more | | |")
        return "\n".join(lines) + "\n"
