"""Continual-learning scenarios on the shipped digits, and the loop that measures a learner on them.

Honest pretraining. A device's backbone is pretrained at the factory on data that is *not* the stream.
Every scenario splits each digit class three ways with fixed seeds: 25 % test (the same stratified split
as :func:`ondevice.data.class_incremental`), and the remaining 75 % halved into a *pretraining pool* and
the *stream*. The backbone never sees a stream or test sample:

- ``"class-incremental"``: ``cnn`` pretrained on the pool's digits 0-4 only (digits 5-9 are never seen
  before the stream); the head is replaced by a fresh 2-class head that grows as labels arrive; the
  stream brings digits 0-9 in 5 experiences of 2 classes (0-1, 2-3, ...).
- ``"class-incremental-novel"``: ``cnn`` pretrained on every non-test sample of digits 0-3; the stream
  brings only digits 4-9 (relabelled 0-5) in 3 experiences of 2 classes, so no stream class was seen in
  pretraining (the stream's own samples are the stream half, as above).
- ``"domain-incremental"``: ``cnn`` pretrained on the pool's clean digits 0-9 (the factory model, head
  kept); the stream brings all ten classes under shifting conditions: clean, rotated 30 degrees,
  gaussian noise (std 0.8), contrast 40 % (:data:`ondevice.data.DEFAULT_DOMAIN_SHIFTS`).
- ``"sensor"``: ``cnn1d`` on the digits scanned row by row into 64-step series
  (``load_digits(layout="sequence")``), pretrained on the pool's clean series 0-9 (head kept); the stream
  drifts like an ageing sensor: clean, gain 0.5 (``contrast``), noise (std 0.6), gain 0.5 with noise
  (std 0.4).

:func:`run_scenario` feeds each experience once, in a seeded random order, in small batches, then
measures every experience's test accuracy to build the accuracy matrix (:mod:`~ondevice.continual.metrics`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ondevice.continual.learner import Learner
from ondevice.continual.metrics import ContinualMetrics
from ondevice.continual.prequential import ObserveResult
from ondevice.data import DEFAULT_DOMAIN_SHIFTS, Experience, Stream, TensorData, domain_shift, load_digits
from ondevice.data.splits import stratified_split
from ondevice.errors import ConfigError, UnknownNameError
from ondevice.models import ClassifierModel
from ondevice.pretrain import pretrain_backbone

__all__ = [
    "SCENARIOS",
    "ContinualResult",
    "Scenario",
    "load_scenario",
    "pretrain_backbone",
    "run_scenario",
]

logger = logging.getLogger(__name__)

ScenarioName = Literal["class-incremental", "class-incremental-novel", "domain-incremental", "sensor"]
SCENARIOS: tuple[str, ...] = ("class-incremental", "class-incremental-novel", "domain-incremental", "sensor")
_SENSOR_SHIFTS: tuple[tuple[tuple[str, float], ...], ...] = (
    (),
    (("contrast", 0.5),),
    (("noise", 0.6),),
    (("contrast", 0.5), ("noise", 0.4)),
)


@dataclass(frozen=True, eq=False)
class Scenario:
    """A stream of experiences plus the factory data its backbone is pretrained on.

    Attributes:
        name: the scenario's name.
        experiences: the stream, in order (train parts are the stream, test parts measure it).
        pretrain_data: the pool the backbone is pretrained on (disjoint from every experience).
        model: zoo model name of the backbone; ``model_kwargs`` its arguments.
        initial_classes: rows of the head when the stream starts (a fresh head when it differs from the
            pretraining classes).
        description: one line for reports.
    """

    name: str
    experiences: tuple[Experience, ...]
    pretrain_data: TensorData
    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    initial_classes: int = 10
    description: str = ""

    @property
    def pretrain_classes(self) -> tuple[int, ...]:
        return self.pretrain_data.classes

    def backbone(
        self, *, epochs: int = 20, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None
    ) -> ClassifierModel:
        """The pretrained backbone (cached), its head sized for the start of the stream."""
        model = pretrain_backbone(
            self.model, self.pretrain_data, epochs=epochs, seed=seed, cache_dir=cache_dir, **self.model_kwargs
        )
        if self.initial_classes != model.num_classes:
            model.replace_head(self.initial_classes)
        return model


def _three_way(y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices (pool, stream, test): 25 % test, the rest halved per class."""
    train, test = stratified_split(y, test_fraction=0.25, seed=seed)
    stream_pos, pool_pos = stratified_split(y[train], test_fraction=0.5, seed=seed + 1)
    return train[pool_pos], train[stream_pos], test


def _shift(data: TensorData, shifts: Sequence[tuple[str, float]], seed: int) -> TensorData:
    for k, (kind, severity) in enumerate(shifts):
        data = domain_shift(data, kind, severity, seed=seed + 31 * k)  # type: ignore[arg-type]
    return data


def load_scenario(name: ScenarioName | str, *, seed: int = 0, image_size: int = 8) -> Scenario:
    """Build a scenario by name (see the module docstring): ``"class-incremental"``,
    ``"domain-incremental"`` or ``"sensor"``.

    ``image_size`` resizes the digits (bilinear) for the image scenarios and sizes the ``cnn`` to match;
    a device's camera frame is far larger than an 8x8 digit, which matters for replay-buffer bytes.
    """
    if name not in SCENARIOS:
        raise UnknownNameError("scenario", name, SCENARIOS)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 64:
        raise ConfigError(f"image_size must be an int in 8..64, got {image_size!r}")
    data = load_digits(layout="sequence") if name == "sensor" else load_digits(image_size=image_size)
    image_kwargs: dict[str, Any] = {} if image_size == 8 else {"resolution": image_size}
    pool, stream, test = _three_way(data.y, seed)
    train_part, test_part, pool_part = data.subset(stream), data.subset(test), data.subset(pool)
    if name == "class-incremental":
        experiences = []
        for i, group in enumerate(np.array_split(np.arange(10), 5)):
            classes = tuple(int(c) for c in group)
            mask = torch.tensor(classes)
            experiences.append(
                Experience(
                    i,
                    classes,
                    train_part.subset(torch.isin(train_part.y, mask)),
                    test_part.subset(torch.isin(test_part.y, mask)),
                )
            )
        source = pool_part.subset(pool_part.y < 5)
        return Scenario(
            name,
            tuple(experiences),
            source,
            "cnn",
            model_kwargs=image_kwargs,
            initial_classes=2,
            description="digits 0-9 in 5 experiences of 2 classes; cnn pretrained on held-out digits 0-4",
        )
    if name == "class-incremental-novel":
        novel = []
        for i, first in enumerate((4, 6, 8)):
            mask = torch.tensor((first, first + 1))
            train_exp = train_part.subset(torch.isin(train_part.y, mask))
            test_exp = test_part.subset(torch.isin(test_part.y, mask))
            novel.append(
                Experience(
                    i,
                    (first - 4, first - 3),
                    TensorData(train_exp.x, train_exp.y - 4),
                    TensorData(test_exp.x, test_exp.y - 4),
                )
            )
        known = torch.cat([pool, stream])
        source = data.subset(known).subset(data.y[known] < 4)
        return Scenario(
            name,
            tuple(novel),
            source,
            "cnn",
            model_kwargs=image_kwargs,
            initial_classes=2,
            description="digits 4-9 (as 0-5) in 3 experiences of 2; cnn pretrained on digits 0-3 only",
        )
    if name == "domain-incremental":
        shifts: list[tuple[tuple[str, float], ...]] = [
            () if s is None else (s,) for s in DEFAULT_DOMAIN_SHIFTS
        ]
        model, kwargs, what = "cnn", image_kwargs, "clean, rotation 30, noise 0.8, contrast 0.4"
    else:
        shifts = list(_SENSOR_SHIFTS)
        model, kwargs, what = "cnn1d", {}, "clean, gain 0.5, noise 0.6, gain 0.5 + noise 0.4"
    experiences = [
        Experience(
            i,
            data.classes,
            _shift(train_part, shift, seed + 100 * i),
            _shift(test_part, shift, seed + 100 * i + 7),
            shift[0] if len(shift) == 1 else None,  # type: ignore[arg-type]
        )
        for i, shift in enumerate(shifts)
    ]
    return Scenario(
        name,
        tuple(experiences),
        pool_part,
        model,
        model_kwargs=kwargs,
        initial_classes=10,
        description=f"digits 0-9 under {what}; {model} pretrained on held-out clean digits",
    )


@dataclass(frozen=True)
class ContinualResult:
    """What :func:`run_scenario` measured.

    Attributes:
        metrics: ACC, BWT, FWT, forgetting over the accuracy matrix.
        final_accuracy: accuracy of the final model on the union of all test sets.
        samples: stream samples observed; ``seconds``: time in ``observe``.
        samples_per_second: ``samples / seconds``.
        buffer_bytes: bytes of the replay buffer (0 without one); ``buffer_samples``: its capacity.
        bytes_per_sample: bytes one buffered sample takes (0 without a buffer).
        prequential_accuracy: new samples classified right before training on them.
        drifts: drifts the detector reported.
    """

    metrics: ContinualMetrics
    final_accuracy: float
    samples: int
    seconds: float
    samples_per_second: float
    buffer_bytes: int
    buffer_samples: int
    bytes_per_sample: int
    prequential_accuracy: float
    drifts: int

    def to_dict(self) -> dict[str, Any]:
        payload = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "metrics"}
        payload.update(self.metrics.to_dict())
        return payload


def run_scenario(
    learner: Learner,
    experiences: Scenario | Sequence[Experience],
    *,
    batch_size: int = 10,
    seed: int = 0,
    on_result: Callable[[ObserveResult], None] | None = None,
    on_experience: Callable[[int, list[float]], None] | None = None,
) -> ContinualResult:
    """Stream every experience once (seeded random order, ``batch_size`` samples per observe), mark its
    end, and measure all test sets after it; the accuracy matrix and baseline are recorded in the learner.

    The baseline ``b_j`` is the accuracy on each experience of the learner's model before the stream.
    """
    exps = tuple(experiences.experiences if isinstance(experiences, Scenario) else experiences)
    if not exps:
        raise ConfigError("run_scenario needs at least one experience")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    learner.record_accuracies([learner.accuracy(e.test) for e in exps], baseline=True)
    samples_before, seconds_before = learner.state.trained_samples, learner.state.train_seconds
    for i, exp in enumerate(exps):
        learner.learn(
            Stream(exp.train, batch_size=batch_size, shuffle=True, seed=seed + i), on_result=on_result
        )
        learner.end_experience()
        row = [learner.accuracy(e.test) for e in exps]
        learner.record_accuracies(row)
        if on_experience is not None:
            on_experience(i, row)
        logger.info("after experience %d: %s", i, " ".join(f"{a:.3f}" for a in row))
    matrix = learner.state.accuracy_matrix[-len(exps) :]
    metrics = ContinualMetrics.from_matrix(matrix, learner.state.baseline)
    all_test = TensorData(torch.cat([e.test.x for e in exps]), torch.cat([e.test.y for e in exps]))
    samples = learner.state.trained_samples - samples_before
    seconds = learner.state.train_seconds - seconds_before
    buffer = learner.buffer
    return ContinualResult(
        metrics=metrics,
        final_accuracy=learner.accuracy(all_test),
        samples=samples,
        seconds=seconds,
        samples_per_second=samples / seconds if seconds > 0 else 0.0,
        buffer_bytes=learner.buffer_bytes,
        buffer_samples=(buffer.capacity or 0) if buffer is not None else 0,
        bytes_per_sample=buffer.bytes_per_sample() if buffer is not None and buffer.sample_shape else 0,
        prequential_accuracy=learner.state.prequential_accuracy,
        drifts=learner.state.drifts,
    )
