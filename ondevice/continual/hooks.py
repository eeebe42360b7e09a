"""What a learner does when its drift detector reports a change: hooks called as ``hook(event, learner)``.

:class:`LogDrift` logs, :class:`BoostLR` raises the learning rate for a while, :class:`SnapshotOnDrift`
saves the learner; any callable taking ``(event, learner)`` is a hook too.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from ondevice.continual.config import positive_int
from ondevice.errors import ConfigError

__all__ = ["BoostLR", "DriftEvent", "DriftTarget", "LogDrift", "SnapshotOnDrift"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriftEvent:
    """A change the drift detector reported: at which stream position, on which value."""

    position: int
    value: float
    detector: str
    count: int


class DriftTarget(Protocol):
    """What the built-in hooks use of the learner they are called with (a :class:`Learner` is one)."""

    def boost_lr(self, factor: float, batches: int) -> None: ...

    def save(self, path: str | os.PathLike[str], *, extra: dict[str, Any] | None = None) -> Path: ...


class LogDrift:
    """Drift hook: log the event at WARNING."""

    def __call__(self, event: DriftEvent, learner: DriftTarget) -> None:
        logger.warning(
            "drift detected by %s at sample %d (loss %.4f; %d so far)",
            event.detector,
            event.position,
            event.value,
            event.count,
        )


@dataclass(frozen=True)
class BoostLR:
    """Drift hook: multiply the learning rate by ``factor`` for the next ``batches`` observed batches."""

    factor: float = 3.0
    batches: int = 50

    def __post_init__(self) -> None:
        if not isinstance(self.factor, int | float) or isinstance(self.factor, bool) or not self.factor > 0:
            raise ConfigError(f"BoostLR.factor must be > 0, got {self.factor!r}")
        positive_int("BoostLR", "batches", self.batches)

    def __call__(self, event: DriftEvent, learner: DriftTarget) -> None:
        learner.boost_lr(self.factor, self.batches)


@dataclass(frozen=True)
class SnapshotOnDrift:
    """Drift hook: save the learner to ``directory/drift-<position>.safetensors`` (atomically)."""

    directory: str

    def __call__(self, event: DriftEvent, learner: DriftTarget) -> None:
        path = Path(self.directory) / f"drift-{event.position:09d}.safetensors"
        learner.save(path, extra={"drift": asdict(event)})
        logger.info("drift snapshot written to %s", path)
