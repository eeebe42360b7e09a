"""Replay buffers with a byte budget: reservoir and class-balanced, for raw inputs or latents.

A buffer holds at most ``capacity`` samples, given directly or derived from ``capacity_bytes`` once the
first sample shows how many bytes one takes (values, 8-bit scales and a 2-byte label). Its storage is
allocated once, at the first :meth:`ReplayBuffer.add`, and :attr:`ReplayBuffer.buffer_bytes` reports
exactly those allocated bytes, which count toward the device's memory budget.

Policies:

- :class:`ReservoirBuffer`: Vitter's Algorithm R (Vitter, ACM TOMS 1985, "Random sampling with a
  reservoir"): every sample seen so far is in the buffer with equal probability ``capacity / seen``.
- :class:`ClassBalancedBuffer`: class-balanced reservoir sampling (Chrysakis & Moens, ICML 2020, "Online
  Continual Learning from Imbalanced Data", Alg. 1): when full, a sample of a class that is not the
  largest replaces a random sample of the largest class; one of a largest class replaces a random sample
  of its own class with probability ``stored_c / seen_c``. It wins over reservoir at tiny buffers.

With ``logits=True`` a buffer also keeps the logits each sample had when it was stored (float32, at the
head's width then), for Dark Experience Replay (Buzzega et al., NeurIPS 2020, "Dark Experience for General
Continual Learning: a Strong, Simple Baseline"). A head that grows later widens the storage with zeros,
and every sample remembers how many of its columns are real (:class:`ReplayDraw`'s ``logit_mask``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ondevice.continual.latent import SampleCodec
from ondevice.errors import CheckpointError, CheckpointMismatchError, ConfigError, UnknownNameError

__all__ = [
    "BufferConfig",
    "ClassBalancedBuffer",
    "ReplayBuffer",
    "ReplayDraw",
    "ReservoirBuffer",
    "buffer_from_config",
]

logger = logging.getLogger(__name__)

Policy = Literal["reservoir", "class_balanced"]
LABEL_BYTES = 2  # labels are stored as int16
LOGIT_BYTES = 4  # stored logits are float32
LOGIT_WIDTH_BYTES = 2  # each sample's count of real logit columns, int16
_MAX_LABEL = 2**15 - 1


def _count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"BufferConfig.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class BufferConfig:
    """Settings of a replay buffer (JSON-serialisable, carried in checkpoints).

    Attributes:
        policy: ``"reservoir"`` or ``"class_balanced"``.
        capacity: maximum number of samples; exactly one of ``capacity`` and ``capacity_bytes``.
        capacity_bytes: byte budget; the capacity is ``capacity_bytes // bytes_per_sample``.
        bits: 32 (float32) or 8 (uint8 with per-sample/per-channel scale, see :class:`SampleCodec`).
        seed: seeds the buffer's generator (insertions and draws).
        logits: also keep each sample's logits (Dark Experience Replay); they count in the bytes.
    """

    policy: Policy = "reservoir"
    capacity: int | None = None
    capacity_bytes: int | None = None
    bits: Literal[8, 32] = 32
    seed: int = 0
    logits: bool = False

    def __post_init__(self) -> None:
        if self.policy not in _POLICIES:
            raise UnknownNameError("buffer policy", self.policy, _POLICIES)
        if (self.capacity is None) == (self.capacity_bytes is None):
            raise ConfigError(
                f"give a replay buffer exactly one of capacity (samples) and capacity_bytes, got "
                f"capacity={self.capacity!r}, capacity_bytes={self.capacity_bytes!r}"
            )
        if self.capacity is not None:
            _count("capacity", self.capacity)
        if self.capacity_bytes is not None:
            _count("capacity_bytes", self.capacity_bytes)
        SampleCodec(self.bits)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"BufferConfig.seed must be an int, got {self.seed!r}")
        if not isinstance(self.logits, bool):
            raise ConfigError(f"BufferConfig.logits must be a bool, got {self.logits!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ReplayDraw:
    """A mini-batch drawn from a buffer: inputs, labels and, in a buffer with logits, the stored logits.

    Attributes:
        x: float32 samples ``(N, ...)``; ``y``: int64 labels ``(N,)``.
        logits: float32 ``(N, W)`` at the widest head seen (None in a buffer without logits).
        logit_mask: bool ``(N, W)``, True on the columns the head had when the sample was stored.
    """

    x: Tensor
    y: Tensor
    logits: Tensor | None = field(default=None)
    logit_mask: Tensor | None = field(default=None)


class ReplayBuffer:
    """Base class of the replay buffers; subclasses choose which slot a new sample takes.

    Args:
        capacity: maximum number of samples (or give ``capacity_bytes``).
        capacity_bytes: byte budget for the stored samples.
        bits: 32 or 8 (see :class:`~ondevice.continual.latent.SampleCodec`).
        seed: seeds insertions and draws; the generator state is saved with the buffer.
        logits: also store each sample's logits (for DER++; see the module docstring).
    """

    policy: ClassVar[str] = ""

    def __init__(
        self,
        capacity: int | None = None,
        *,
        capacity_bytes: int | None = None,
        bits: Literal[8, 32] = 32,
        seed: int = 0,
        logits: bool = False,
    ) -> None:
        self.config = BufferConfig(
            policy=self.policy,  # type: ignore[arg-type]
            capacity=capacity,
            capacity_bytes=capacity_bytes,
            bits=bits,
            seed=seed,
            logits=logits,
        )
        self.codec = SampleCodec(bits)
        self.generator = torch.Generator().manual_seed(seed)
        self.seen = 0
        self.seen_per_class: dict[int, int] = {}
        self._size = 0
        self._sample_shape: tuple[int, ...] | None = None
        self._capacity: int | None = capacity
        self._values: Tensor | None = None
        self._params: Tensor | None = None
        self._labels: Tensor | None = None
        self._logits: Tensor | None = None
        self._logit_width: Tensor | None = None

    # -- sizes ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._size

    @property
    def capacity(self) -> int | None:
        """Maximum samples (None until the first sample when only ``capacity_bytes`` was given)."""
        return self._capacity

    @property
    def sample_shape(self) -> tuple[int, ...] | None:
        """Shape of one stored sample (None before the first one)."""
        return self._sample_shape

    @property
    def logit_width(self) -> int:
        """Columns of the stored logits (0 without logits or before the first sample)."""
        return int(self._logits.shape[1]) if self._logits is not None else 0

    def bytes_per_sample(
        self, sample_shape: tuple[int, ...] | None = None, *, logit_width: int | None = None
    ) -> int:
        """Bytes one stored sample takes (values, 8-bit scales, a 2-byte label and, with logits, its
        ``logit_width`` float32 logits and their 2-byte width)."""
        shape = sample_shape or self._sample_shape
        if shape is None:
            raise ConfigError("the buffer has seen no sample yet; pass sample_shape")
        per_sample = self.codec.bytes_per_sample(shape) + LABEL_BYTES
        if self.config.logits:
            width = self.logit_width if logit_width is None else logit_width
            per_sample += LOGIT_BYTES * width + LOGIT_WIDTH_BYTES
        return per_sample

    @property
    def buffer_bytes(self) -> int:
        """Bytes of allocated storage (0 before the first sample): what counts toward a memory budget."""
        return sum(
            t.numel() * t.element_size()
            for t in (self._values, self._params, self._labels, self._logits, self._logit_width)
            if t is not None
        )

    def class_counts(self) -> dict[int, int]:
        """Stored samples per label."""
        if self._labels is None or self._size == 0:
            return {}
        labels, counts = torch.unique(self._labels[: self._size], return_counts=True)
        return {int(c): int(n) for c, n in zip(labels.tolist(), counts.tolist(), strict=True)}

    # -- adding and drawing ----------------------------------------------------------------------------
    def add(self, x: Tensor, y: Tensor, logits: Tensor | None = None) -> int:
        """Offer a batch ``x`` (N, ...) with labels ``y`` (N,) and, in a buffer with logits, their logits
        ``(N, W)``; returns how many samples were stored."""
        if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ConfigError(
                f"add() needs a batch x of shape (N, ...) and labels y of shape (N,), got {tuple(x.shape)} "
                f"and {tuple(y.shape)}"
            )
        if self.config.logits != (logits is not None):
            raise ConfigError(
                "this replay buffer stores logits; pass add(x, y, logits)"
                if self.config.logits
                else "this replay buffer stores no logits; create it with logits=True to keep them"
            )
        if logits is not None and (logits.dim() != 2 or logits.shape[0] != x.shape[0] or logits.shape[1] < 1):
            raise ConfigError(f"logits must have shape (N, W) with N={x.shape[0]}, got {tuple(logits.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > _MAX_LABEL):
            raise ConfigError(
                f"replay buffer labels must be in 0..{_MAX_LABEL}, got {int(y.min())}..{int(y.max())}"
            )
        shape = tuple(int(s) for s in x.shape[1:])
        self._allocate(shape, logit_width=0 if logits is None else int(logits.shape[1]))
        if logits is not None:
            self._widen_logits(int(logits.shape[1]))
        values, params = self.codec.encode(x)
        stored = 0
        for i in range(x.shape[0]):
            label = int(y[i])
            self.seen += 1
            self.seen_per_class[label] = self.seen_per_class.get(label, 0) + 1
            slot = self._choose_slot(label)
            if slot is None:
                continue
            if logits is not None:
                self._write_logits(slot, logits[i])
            self._write(slot, values[i], None if params is None else params[i], label)
            stored += 1
        return stored

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """Draw ``min(n, len(self))`` distinct samples uniformly: ``(x float32, y int64)``."""
        draw = self.draw(n)
        return draw.x, draw.y

    def draw(self, n: int) -> ReplayDraw:
        """Draw ``min(n, len(self))`` distinct samples uniformly, with their stored logits if any."""
        if self._size == 0 or n <= 0:
            raise ConfigError("cannot sample from an empty replay buffer (or with n <= 0)")
        idx = torch.randperm(self._size, generator=self.generator)[:n]
        x, y = self._decode(idx), self._labels[idx].to(torch.int64)  # type: ignore[index]
        if self._logits is None or self._logit_width is None:
            return ReplayDraw(x, y)
        width = self._logit_width[idx].to(torch.int64)
        mask = torch.arange(self._logits.shape[1]).unsqueeze(0) < width.unsqueeze(1)
        return ReplayDraw(x, y, self._logits[idx].clone(), mask)

    def contents(self) -> tuple[Tensor, Tensor]:
        """Every stored sample, decoded: ``(x float32, y int64)``."""
        idx = torch.arange(self._size)
        if self._size == 0:
            raise ConfigError("the replay buffer is empty")
        return self._decode(idx), self._labels[idx].to(torch.int64)  # type: ignore[index]

    # -- policy ---------------------------------------------------------------------------------------
    def _choose_slot(self, label: int) -> int | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    # -- storage --------------------------------------------------------------------------------------
    def _allocate(self, shape: tuple[int, ...], *, logit_width: int = 0) -> None:
        if self._sample_shape is not None:
            if shape != self._sample_shape:
                raise ConfigError(
                    f"this replay buffer stores samples of shape {self._sample_shape}, got {shape}"
                )
            return
        per_sample = self.bytes_per_sample(shape, logit_width=logit_width)
        if self._capacity is None:
            budget = int(self.config.capacity_bytes or 0)
            self._capacity = budget // per_sample
            if self._capacity < 1:
                raise ConfigError(
                    f"capacity_bytes={budget} cannot hold one sample of shape {shape} "
                    f"({per_sample} bytes); raise it or store 8-bit samples"
                )
        self._sample_shape = shape
        cap = self._capacity
        dtype = torch.uint8 if self.codec.bits == 8 else torch.float32
        self._values = torch.zeros((cap, *shape), dtype=dtype)
        if self.codec.bits == 8:
            self._params = torch.zeros((cap, 2, *SampleCodec.scale_shape(shape)), dtype=torch.float32)
        self._labels = torch.zeros(cap, dtype=torch.int16)
        if self.config.logits:
            self._logits = torch.zeros((cap, logit_width), dtype=torch.float32)
            self._logit_width = torch.zeros(cap, dtype=torch.int16)
        logger.debug("replay buffer: %d samples of shape %s, %d bytes", cap, shape, self.buffer_bytes)

    def _write(self, slot: int, values: Tensor, params: Tensor | None, label: int) -> None:
        assert self._values is not None and self._labels is not None
        self._values[slot] = values
        if params is not None and self._params is not None:
            self._params[slot] = params
        self._labels[slot] = label
        if slot == self._size:
            self._size += 1

    def _widen_logits(self, width: int) -> None:
        """Widen the logit storage to ``width`` columns (a grown head), zero-padding the old samples.

        A buffer sized by ``capacity_bytes`` keeps its capacity, so its bytes may pass the budget by
        ``4 * (new - old width)`` per sample; size it for the final head to stay inside.
        """
        if self._logits is None or width <= self._logits.shape[1]:
            return
        if width > _MAX_LABEL:
            raise ConfigError(f"logits may have at most {_MAX_LABEL} columns, got {width}")
        wider = torch.zeros((self._logits.shape[0], width), dtype=torch.float32)
        wider[:, : self._logits.shape[1]] = self._logits
        self._logits = wider

    def _write_logits(self, slot: int, logits: Tensor) -> None:
        assert self._logits is not None and self._logit_width is not None
        width = int(logits.shape[0])
        self._logits[slot].zero_()
        self._logits[slot, :width] = logits.detach().to(torch.float32)
        self._logit_width[slot] = width

    def _decode(self, idx: Tensor) -> Tensor:
        assert self._values is not None
        params = self._params[idx] if self._params is not None else None
        return self.codec.decode(self._values[idx], params)

    # -- state ----------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        """The stored samples (filled part only) and the generator state, for a checkpoint."""
        tensors = {"rng": self.generator.get_state()}
        if self._values is not None and self._labels is not None:
            tensors["values"] = self._values[: self._size]
            tensors["labels"] = self._labels[: self._size]
            if self._params is not None:
                tensors["params"] = self._params[: self._size]
            if self._logits is not None and self._logit_width is not None:
                tensors["logits"] = self._logits[: self._size]
                tensors["logit_width"] = self._logit_width[: self._size]
        return tensors

    def state_metadata(self) -> dict[str, Any]:
        """Settings and counters as JSON."""
        return {
            "config": self.config.to_dict(),
            "seen": self.seen,
            "seen_per_class": {str(k): v for k, v in sorted(self.seen_per_class.items())},
            "size": self._size,
            "capacity": self._capacity,
            "sample_shape": list(self._sample_shape) if self._sample_shape is not None else None,
            "logit_width": self.logit_width,
        }

    def load_state(self, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> None:
        """Restore what :meth:`state_tensors` and :meth:`state_metadata` saved (validated)."""
        if metadata.get("config") != self.config.to_dict():
            raise CheckpointMismatchError(
                f"the checkpoint's replay buffer has settings {metadata.get('config')}, this buffer has "
                f"{self.config.to_dict()}; create the learner with the same buffer"
            )
        self.__init__(  # type: ignore[misc]
            self.config.capacity,
            capacity_bytes=self.config.capacity_bytes,
            bits=self.config.bits,
            seed=self.config.seed,
            logits=self.config.logits,
        )
        if "rng" not in tensors:
            raise CheckpointError("the checkpoint's replay buffer has no generator state")
        self.generator.set_state(tensors["rng"].clone())
        self.seen = int(metadata.get("seen", 0))
        self.seen_per_class = {int(k): int(v) for k, v in (metadata.get("seen_per_class") or {}).items()}
        shape = metadata.get("sample_shape")
        size = int(metadata.get("size", 0))
        if shape is None:
            if size:
                raise CheckpointError("the checkpoint's replay buffer has samples but no sample shape")
            return
        width = int(metadata.get("logit_width") or 0)
        self._allocate(tuple(int(s) for s in shape), logit_width=width)
        self._widen_logits(width)
        if self._capacity != metadata.get("capacity"):
            raise CheckpointMismatchError(
                f"the checkpoint's replay buffer holds {metadata.get('capacity')} samples, this one "
                f"{self._capacity}"
            )
        values, labels = tensors.get("values"), tensors.get("labels")
        if size and (values is None or labels is None):
            raise CheckpointError("the checkpoint's replay buffer lacks its samples")
        if size:
            assert self._values is not None and self._labels is not None
            assert values is not None and labels is not None  # checked just above
            assert self._sample_shape is not None  # set by _allocate
            if tuple(values.shape) != (size, *self._sample_shape) or values.dtype != self._values.dtype:
                raise CheckpointError(
                    f"replay buffer samples have shape {tuple(values.shape)} {values.dtype}, expected "
                    f"{(size, *self._sample_shape)} {self._values.dtype}"
                )
            self._values[:size] = values
            self._labels[:size] = labels
            if self._params is not None:
                params = tensors.get("params")
                if params is None or params.shape[0] != size:
                    raise CheckpointError("the checkpoint's 8-bit replay buffer lacks its scales")
                self._params[:size] = params
            if self._logits is not None and self._logit_width is not None:
                logits, widths = tensors.get("logits"), tensors.get("logit_width")
                if (
                    logits is None
                    or widths is None
                    or tuple(logits.shape) != (size, width)
                    or widths.shape[0] != size
                ):
                    raise CheckpointError(
                        f"the checkpoint's replay buffer lacks its logits of shape {(size, width)}"
                    )
                self._logits[:size] = logits
                self._logit_width[:size] = widths.to(torch.int16)
        self._size = size


class ReservoirBuffer(ReplayBuffer):
    """Reservoir sampling (Vitter 1985, Algorithm R): each seen sample is kept with probability
    ``capacity / seen``."""

    policy: ClassVar[str] = "reservoir"

    def _choose_slot(self, label: int) -> int | None:
        assert self._capacity is not None
        if self._size < self._capacity:
            return self._size
        j = self._randint(self.seen)
        return j if j < self._capacity else None


class ClassBalancedBuffer(ReplayBuffer):
    """Class-balanced reservoir sampling (Chrysakis & Moens, ICML 2020, Alg. 1)."""

    policy: ClassVar[str] = "class_balanced"

    def _choose_slot(self, label: int) -> int | None:
        assert self._capacity is not None and self._labels is not None
        if self._size < self._capacity:
            return self._size
        counts = self.class_counts()
        largest = max(counts.values())
        if counts.get(label, 0) < largest:
            biggest = sorted(c for c, n in counts.items() if n == largest)
            victim_class = biggest[self._randint(len(biggest))]
            candidates = (self._labels[: self._size] == victim_class).nonzero().flatten()
            return int(candidates[self._randint(candidates.numel())])
        stored, seen = counts.get(label, 0), self.seen_per_class[label]
        if self._randint(seen) >= stored:
            return None
        candidates = (self._labels[: self._size] == label).nonzero().flatten()
        return int(candidates[self._randint(candidates.numel())])


_POLICIES: dict[str, type[ReplayBuffer]] = {
    "class_balanced": ClassBalancedBuffer,
    "reservoir": ReservoirBuffer,
}


def buffer_from_config(config: BufferConfig | dict[str, Any]) -> ReplayBuffer:
    """A fresh buffer from a :class:`BufferConfig` or its dict (as stored in checkpoints)."""
    if isinstance(config, dict):
        known = set(BufferConfig.__dataclass_fields__)
        unknown = sorted(set(config) - known)
        if unknown:
            raise CheckpointError(f"unknown replay buffer field(s) {unknown}; fields are {sorted(known)}")
        config = BufferConfig(**config)
    cls = _POLICIES[config.policy]
    return cls(
        config.capacity,
        capacity_bytes=config.capacity_bytes,
        bits=config.bits,
        seed=config.seed,
        logits=config.logits,
    )
