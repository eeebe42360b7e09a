"""Concept-drift detectors on a stream of numbers (a loss or an error rate), as small pure classes.

Each detector has ``update(value) -> bool`` (True when a change is detected at this value), ``reset()``,
and ``to_dict()`` / ``from_dict()`` so that its running state rides in a learner checkpoint as JSON.
They are our own implementations (``river`` has both but does not install on 32-bit Pi OS).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

from ondevice.errors import CheckpointError, ConfigError, UnknownNameError

__all__ = ["ADWIN", "DriftDetector", "PageHinkley", "detector_from_dict"]


def _positive(owner: str, name: str, value: object, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not isinstance(value, int | float) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{owner}.{name} must be a finite number {bound}, got {value!r}")


class DriftDetector:
    """Base class: ``update(value) -> bool``; ``detections`` counts the changes seen so far."""

    kind: ClassVar[str] = ""

    def update(self, value: float) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class PageHinkley(DriftDetector):
    """Page-Hinkley test for a rise (or fall) of the mean (Page, Biometrika 1954, "Continuous inspection
    schemes"; the form of Gama et al. 2013, Sec. 3.2).

    With the running mean ``m_t`` of the values, ``U_t = alpha * U_{t-1} + (x_t - m_t - delta)`` and
    ``M_t = min_{s <= t} U_s``; a rise is signalled when ``U_t - M_t > threshold`` (mirror-image for
    ``direction="decrease"``). The detector then resets itself.

    Attributes:
        delta: magnitude of change tolerated (in the values' units).
        threshold: the detection threshold ``lambda``; larger means fewer, later alarms.
        alpha: fading factor of ``U`` (1.0 is the textbook test).
        min_instances: values seen before any alarm can be raised.
        direction: ``"increase"`` (a loss going up) or ``"decrease"`` (an accuracy going down).
    """

    kind: ClassVar[str] = "page_hinkley"
    delta: float = 0.005
    threshold: float = 5.0
    alpha: float = 1.0
    min_instances: int = 30
    direction: Literal["increase", "decrease"] = "increase"
    count: int = field(default=0, init=False)
    mean: float = field(default=0.0, init=False)
    cumulative: float = field(default=0.0, init=False)
    minimum: float = field(default=0.0, init=False)
    detections: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        _positive("PageHinkley", "delta", self.delta, allow_zero=True)
        _positive("PageHinkley", "threshold", self.threshold)
        if not isinstance(self.alpha, int | float) or isinstance(self.alpha, bool) or not 0 < self.alpha <= 1:
            raise ConfigError(f"PageHinkley.alpha must be in (0, 1], got {self.alpha!r}")
        if (
            isinstance(self.min_instances, bool)
            or not isinstance(self.min_instances, int)
            or (self.min_instances < 1)
        ):
            raise ConfigError(f"PageHinkley.min_instances must be a positive int, got {self.min_instances!r}")
        if self.direction not in ("increase", "decrease"):
            raise ConfigError(
                f"PageHinkley.direction must be 'increase' or 'decrease', got {self.direction!r}"
            )

    def reset(self) -> None:
        """Forget everything seen (the detection count is kept)."""
        self.count = 0
        self.mean = 0.0
        self.cumulative = 0.0
        self.minimum = 0.0

    def update(self, value: float) -> bool:
        """Feed one value; True when the mean has shifted (the detector then resets)."""
        x = float(value)
        if not math.isfinite(x):
            return False
        if self.direction == "decrease":
            x = -x
        self.count += 1
        self.mean += (x - self.mean) / self.count
        self.cumulative = self.alpha * self.cumulative + (x - self.mean - self.delta)
        self.minimum = min(self.minimum, self.cumulative)
        if self.count >= self.min_instances and self.cumulative - self.minimum > self.threshold:
            self.detections += 1
            self.reset()
            return True
        return False

    def to_dict(self) -> dict[str, Any]:
        """Settings and running state as JSON."""
        return {"kind": self.kind, **asdict(self)}


@dataclass
class ADWIN(DriftDetector):
    """ADaptive WINdowing (Bifet & Gavaldà, SDM 2007, "Learning from time-changing data with adaptive
    windowing", ADWIN2 with the variance-based bound of Sec. 4).

    The window is kept as an exponential histogram: buckets of 1, 2, 4, ... values, at most
    ``max_buckets`` of each size, each holding its count, total and variance, so memory grows with the
    log of the window length. Every ``clock`` values, each cut of the window into an older part ``W0`` and
    a newer part ``W1`` (at bucket boundaries) is tested; if ``|mean(W0) - mean(W1)| > eps_cut`` with
    ``m = 1 / (1/n0 + 1/n1)``, ``delta' = delta / ln(n)`` and
    ``eps_cut = sqrt(2/m * var(W) * ln(2/delta')) + 2/(3m) * ln(2/delta')``, the oldest bucket is dropped
    and the test repeats; a change is reported when anything was dropped.

    Attributes:
        delta: confidence parameter (smaller: fewer false alarms, slower detection).
        clock: test for a change every this many values.
        max_buckets: buckets kept per size (``M`` in the paper).
        min_window: no cut leaves fewer than this many values on either side.
    """

    kind: ClassVar[str] = "adwin"
    delta: float = 0.002
    clock: int = 32
    max_buckets: int = 5
    min_window: int = 5
    buckets: list[list[float]] = field(default_factory=list, init=False)  # [count, total, variance]
    ticks: int = field(default=0, init=False)
    detections: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.delta, float | int) or isinstance(self.delta, bool) or not 0 < self.delta < 1:
            raise ConfigError(f"ADWIN.delta must be in (0, 1), got {self.delta!r}")
        for name in ("clock", "max_buckets", "min_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ADWIN.{name} must be a positive int, got {value!r}")

    @property
    def width(self) -> int:
        """Values in the current window."""
        return int(sum(b[0] for b in self.buckets))

    @property
    def estimate(self) -> float:
        """Mean of the current window (0.0 when empty)."""
        n = self.width
        return sum(b[1] for b in self.buckets) / n if n else 0.0

    def reset(self) -> None:
        """Empty the window (the detection count is kept)."""
        self.buckets = []
        self.ticks = 0

    def update(self, value: float) -> bool:
        """Feed one value; True when the window shrank because its mean changed."""
        x = float(value)
        if not math.isfinite(x):
            return False
        self.buckets.append([1.0, x, 0.0])  # newest last
        self._compress()
        self.ticks += 1
        if self.ticks % self.clock != 0 or self.width < 2 * self.min_window:
            return False
        changed = False
        while self._cut_exists():
            self.buckets.pop(0)
            changed = True
        if changed:
            self.detections += 1
        return changed

    def _compress(self) -> None:
        size = 1.0
        while True:
            same = [i for i, b in enumerate(self.buckets) if b[0] == size]
            if len(same) <= self.max_buckets:
                return
            i, j = same[0], same[1]  # the two oldest buckets of this size (adjacent)
            self.buckets[i] = _merge(self.buckets[i], self.buckets[j])
            del self.buckets[j]
            size *= 2

    def _cut_exists(self) -> bool:
        n = self.width
        if n < 2 * self.min_window or len(self.buckets) < 2:
            return False
        total = sum(b[1] for b in self.buckets)
        whole = self.buckets[0]
        for b in self.buckets[1:]:
            whole = _merge(whole, b)
        variance = whole[2] / n
        delta_prime = self.delta / math.log(n)
        log_term = math.log(2.0 / delta_prime)
        n0 = 0.0
        t0 = 0.0
        for b in self.buckets[:-1]:
            n0 += b[0]
            t0 += b[1]
            n1 = n - n0
            if n0 < self.min_window or n1 < self.min_window:
                continue
            m = 1.0 / (1.0 / n0 + 1.0 / n1)
            eps = math.sqrt(2.0 / m * variance * log_term) + 2.0 / (3.0 * m) * log_term
            if abs(t0 / n0 - (total - t0) / n1) > eps:
                return True
        return False

    def to_dict(self) -> dict[str, Any]:
        """Settings and running state as JSON."""
        return {"kind": self.kind, **asdict(self)}


def _merge(a: list[float], b: list[float]) -> list[float]:
    n = a[0] + b[0]
    mean_a, mean_b = a[1] / a[0], b[1] / b[0]
    variance = a[2] + b[2] + a[0] * b[0] / n * (mean_a - mean_b) ** 2
    return [n, a[1] + b[1], variance]


_DETECTORS: dict[str, type[PageHinkley] | type[ADWIN]] = {"adwin": ADWIN, "page_hinkley": PageHinkley}


def detector_from_dict(payload: dict[str, Any]) -> DriftDetector:
    """Rebuild a detector (settings and running state) from its ``to_dict()`` form."""
    if not isinstance(payload, dict) or "kind" not in payload:
        raise CheckpointError(f"a drift detector dict needs a 'kind' key, got {payload!r}")
    data = dict(payload)
    kind = data.pop("kind")
    if kind not in _DETECTORS:
        raise UnknownNameError("drift detector", kind, _DETECTORS)
    cls = _DETECTORS[kind]
    settings = {
        k: data.pop(k)
        for k in list(data)
        if k in cls.__dataclass_fields__ and cls.__dataclass_fields__[k].init
    }
    detector = cls(**settings)
    for key, value in data.items():
        if key not in cls.__dataclass_fields__:
            raise CheckpointError(f"drift detector {kind!r} has no state field {key!r}")
        setattr(detector, key, value)
    return detector
