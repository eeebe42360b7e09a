"""Memory budgets: how many bytes a training step may use on a device."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from memory.process import RSS_PER_TENSOR_BYTE, STEP_OVERHEAD_BYTES
from ondevice.errors import ConfigError

__all__ = ["Budget", "HasTrainingBudget", "format_bytes", "parse_bytes"]

_UNITS: dict[str, int] = {
    "": 1,
    "B": 1,
    # Memory is sized in binary units (JEDEC): a "256KB" MCU has 262,144 bytes of SRAM, as datasheets and
    # the TinyML literature mean it. KB, KiB and K are therefore all 1024 bytes; see parse_bytes.
    "KB": 1024,
    "MB": 1024**2,
    "GB": 1024**3,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str | int | float) -> int:
    """Parse a byte count such as ``"256KB"``, ``"64MiB"``, ``"1.5 GB"`` or ``1024``.

    Units are binary as memory datasheets use them (JEDEC): ``KB`` = ``KiB`` = ``K`` = 1024 bytes, and so
    on for M and G, so ``"256KB"`` is the 262,144 bytes of a 256 KB microcontroller. Case is ignored.
    """
    if isinstance(text, bool):
        raise ConfigError(f"a byte count must be a number or a string like '256KB', got {text!r}")
    if isinstance(text, int | float):
        if text < 0 or text != text:
            raise ConfigError(f"a byte count must be >= 0, got {text!r}")
        return int(text)
    match = _PATTERN.match(str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"cannot read {text!r} as a byte count; write a number with an optional unit "
            f"(B, KB, MB, GB, KiB, MiB, GiB, K, M, G), e.g. '256KB' or '64MiB'"
        )
    return int(float(match.group(1)) * _UNITS[unit])


@runtime_checkable
class HasTrainingBudget(Protocol):
    """Anything that knows how many bytes a training step may use (e.g. a ``devices.DeviceProfile``)."""

    @property
    def name(self) -> str: ...

    @property
    def training_budget_bytes(self) -> int: ...


@dataclass(frozen=True)
class Budget:
    """A memory budget for one training step.

    Attributes:
        total_bytes: bytes available to activations, trainable parameters, gradients and optimizer state
            (and frozen parameters, when ``count_frozen_params`` is set).
        name: where the figure came from, for reports.
        count_frozen_params: whether frozen weights must also fit in the budget (a Linux board keeps them
            in RAM). ``None`` (the default) means: count them exactly when ``frozen_param_bits`` is below
            32, since asking for 8- or 16-bit frozen weights only changes the plan when they are counted.
            An explicit ``False`` with fewer bits says the frozen weights live outside this budget at that
            width (a microcontroller keeps them, int8, in flash): they are then checked against
            ``flash_bytes`` when it is known.
        frozen_param_bits: storage width of frozen weights (8 for int8 MCU deployment as in TinyTL and
            tiny-training, 32 for float).
        memory_bytes: the device's whole RAM or SRAM when the budget comes from a device (``None`` for a
            bare figure); reports flag a step whose eager peak exceeds it.
        flash_bytes: the device's flash when known; reports flag frozen weights that do not fit in it.
        process_overhead_bytes: when set, the budget is for the *process*: the resident memory the
            training step adds above the runtime (``import torch, ondevice``), which then counts against
            ``total_bytes`` instead of the tensor terms alone. This is the fixed part a step adds beyond
            tensors -- kernel code paged in by the first step, the model's own modules, allocator slack;
            see :mod:`memory.process` for the measured default (:data:`memory.process.STEP_OVERHEAD_BYTES`).
            ``None`` (the default) budgets tensor bytes only, as TinyTL and tiny-training do.
        rss_per_tensor_byte: with ``process_overhead_bytes``, resident bytes per byte of the eager step's
            tensor peak (>= 1; :data:`memory.process.RSS_PER_TENSOR_BYTE` under the SDK's process policy).
    """

    total_bytes: int
    name: str = ""
    count_frozen_params: bool | None = None
    frozen_param_bits: int = 32
    memory_bytes: int | None = None
    flash_bytes: int | None = None
    process_overhead_bytes: int | None = None
    rss_per_tensor_byte: float = 1.1

    def __post_init__(self) -> None:
        if (
            isinstance(self.total_bytes, bool)
            or not isinstance(self.total_bytes, int)
            or self.total_bytes <= 0
        ):
            raise ConfigError(f"Budget.total_bytes must be a positive int, got {self.total_bytes!r}")
        if self.frozen_param_bits not in (8, 16, 32):
            raise ConfigError(f"Budget.frozen_param_bits must be 8, 16 or 32, got {self.frozen_param_bits!r}")
        if self.count_frozen_params is None:
            object.__setattr__(self, "count_frozen_params", self.frozen_param_bits < 32)
        elif not isinstance(self.count_frozen_params, bool):
            raise ConfigError(
                f"Budget.count_frozen_params must be True, False or None (None: count frozen weights when "
                f"frozen_param_bits < 32), got {self.count_frozen_params!r}"
            )
        for attr in ("memory_bytes", "flash_bytes"):
            value = getattr(self, attr)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"Budget.{attr} must be a positive int or None, got {value!r}")
        overhead = self.process_overhead_bytes
        bad = isinstance(overhead, bool) or not isinstance(overhead, int) or overhead < 0
        if overhead is not None and bad:
            raise ConfigError(f"Budget.process_overhead_bytes must be an int >= 0 or None, got {overhead!r}")
        factor = self.rss_per_tensor_byte
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not 1 <= factor < 100:
            raise ConfigError(
                f"Budget.rss_per_tensor_byte must be a number in [1, 100) (resident bytes per tensor byte), "
                f"got {factor!r}"
            )

    @property
    def counts_process(self) -> bool:
        """Whether the budget is for the process's resident memory (``process_overhead_bytes`` is set)."""
        return self.process_overhead_bytes is not None

    @classmethod
    def for_process(cls, value: str | int | float, **kwargs: object) -> Budget:
        """A budget for the resident memory a training step adds above ``import torch, ondevice``.

        Frozen weights count (they live in the process) and the defaults of :mod:`memory.process` give
        the step's fixed overhead and allocator factor unless ``kwargs`` set them.
        """
        kwargs.setdefault("process_overhead_bytes", STEP_OVERHEAD_BYTES)
        kwargs.setdefault("rss_per_tensor_byte", RSS_PER_TENSOR_BYTE)
        kwargs.setdefault("count_frozen_params", True)
        return cls(parse_bytes(value), name=f"{value} of process RSS", **kwargs)  # type: ignore[arg-type]

    @classmethod
    def parse(cls, value: str | int | float | Budget | HasTrainingBudget, **kwargs: object) -> Budget:
        """Make a budget from bytes, a string such as ``"256KB"``, another budget or a device profile."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, HasTrainingBudget):
            return cls.from_profile(value, **kwargs)  # type: ignore[arg-type]
        return cls(parse_bytes(value), name=str(value), **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_profile(cls, profile: HasTrainingBudget, **kwargs: object) -> Budget:
        """The part of a device's memory a training step may use (see ``devices.DeviceProfile``).

        The profile's ``memory_bytes`` and ``flash_bytes`` (when it has them) ride along, so that reports
        can flag figures the device cannot hold, and so do its ``process_overhead_bytes`` and
        ``rss_per_tensor_byte`` (a Linux board's: the step is then budgeted as process RSS); ``kwargs`` set
        the other fields.
        """
        for attr in ("memory_bytes", "flash_bytes", "process_overhead_bytes"):
            if attr not in kwargs:
                kwargs[attr] = getattr(profile, attr, None)
        if "rss_per_tensor_byte" not in kwargs and hasattr(profile, "rss_per_tensor_byte"):
            kwargs["rss_per_tensor_byte"] = profile.rss_per_tensor_byte
        return cls(int(profile.training_budget_bytes), name=profile.name, **kwargs)  # type: ignore[arg-type]

    def fits(self, needed_bytes: int) -> bool:
        """Whether ``needed_bytes`` fit in this budget."""
        return needed_bytes <= self.total_bytes

    def __str__(self) -> str:
        return f"{format_bytes(self.total_bytes)}" + (f" ({self.name})" if self.name else "")


def format_bytes(n: float) -> str:
    """Human-readable binary size: ``format_bytes(720896) == '704.0 KiB'``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover
