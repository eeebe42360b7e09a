"""``Learner``: continual learning on a stream, one sample or one small batch at a time.

The learner trains a :class:`~ondevice.prepared.PreparedModel` under its update scheme. Each call of
:meth:`Learner.observe` is one step of online learning: the new batch is classified first (its loss and
accuracy are *prequential*, measured before the update), then trained on in ``replay_steps`` optimizer
steps. Under the default recipe ``"er"`` (online experience replay as the field runs it: Chaudhry et al.
2019, "On Tiny Episodic Memories in Continual Learning"; Aljundi et al., NeurIPS 2019, MIR) every step
trains the new batch together with a fresh mini-batch drawn from the replay buffer (raw inputs, or latents
that skip the frozen front), plus a regulariser's term, and the new samples are offered to the buffer
afterwards. Recipe ``"once"`` trains the new batch in the first step only and replays the buffer alone
in the others: each stream sample is trained on once, ~25 % less compute per batch at 10 new + 32
replayed, and clearly lower accuracy (see ``bench/continual.py``).

A buffer that keeps logits turns replay into DER++ (Buzzega et al., NeurIPS 2020, "Dark Experience for
General Continual Learning"): the loss is ``CE(new) + der_beta * CE(replayed) + der_alpha * MSE(replayed
logits, stored logits)``, the MSE over the columns the head had when each sample was stored.

A classifier head grows when a label it has no row for arrives (class-incremental learning), keeping
its old rows, the optimizer state of every tensor (padded for the grown head) and the regulariser's.
A drift detector watches the prequential loss and calls hooks (log, raise the learning rate, snapshot).
The whole state saves atomically to one safetensors file (:mod:`ondevice.continual.state`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ondevice.continual.buffer import ClassBalancedBuffer, ReplayBuffer, ReplayDraw, ReservoirBuffer
from ondevice.continual.drift import DriftDetector
from ondevice.continual.latent import LatentSplit, split_model
from ondevice.continual.regularizers import LwF, OnlineEWC, Regularizer
from ondevice.errors import (
    ConfigError,
    InputDtypeError,
    InputShapeError,
    NonFiniteBatchError,
    UnknownNameError,
)
from ondevice.optim import OptimizerConfig, build_optimizer, resolve_optimizer
from ondevice.prepared import PreparedModel

__all__ = [
    "RECIPES",
    "STRATEGIES",
    "BoostLR",
    "DriftEvent",
    "Learner",
    "LearnerConfig",
    "LearnerState",
    "LogDrift",
    "ObserveResult",
    "Recipe",
    "SnapshotOnDrift",
    "Strategy",
    "create_learner",
]

logger = logging.getLogger(__name__)

Strategy = Literal["naive", "replay", "latent-replay", "der", "latent-der", "lwf", "ewc"]
STRATEGIES: tuple[str, ...] = ("der", "ewc", "latent-der", "latent-replay", "lwf", "naive", "replay")
Recipe = Literal["er", "once"]
RECIPES: tuple[str, ...] = ("er", "once")


def _positive_int(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner}.{name} must be a positive int, got {value!r}")


def _weight(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{owner}.{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class LearnerConfig:
    """How a :class:`Learner` trains (JSON-serialisable; checkpoints carry it).

    Attributes:
        replay: ``"input"`` replays raw inputs; ``"latent"`` stores and replays activations at the
            boundary of the frozen front (:mod:`ondevice.continual.latent`), running only the tail.
        replay_batch_size: samples drawn from the buffer per step.
        replay_steps: optimizer steps per observed batch, each with a fresh replay draw.
        recipe: ``"er"`` (default): every step trains the new batch together with its replay draw;
            ``"once"``: only the first step trains the new batch, the others replay alone (each stream
            sample trained once: ~25 % less compute at 10 new + 32 replayed). Equal when ``replay_steps``
            is 1. Measured in ``bench/continual.py`` (seeds 100-102): ``"once"`` is about a point better
            from scratch with a growing head, but 7 points worse with a fixed head and 4 points worse
            when only the head trains on a pretrained backbone, so ``"er"`` is the default.
        der_alpha: DER++ weight of the logit-matching MSE on replayed samples (a buffer with logits only).
        der_beta: DER++ weight of the cross-entropy on replayed samples (a buffer with logits only).
            Both defaults were tuned on seeds 100-102 of ``bench/continual.py`` (alpha in {0.03, 0.1,
            0.3}, beta in {1, 3.2}); beta 3.2 (= 32 replayed / 10 new) weighs every sample as ER does.
        grow_head: grow the classifier head when an unseen label arrives; otherwise such labels raise.
        max_classes: the head never grows beyond this many rows (guards against garbage labels).
        on_nonfinite: ``"skip"`` (count and skip batches with NaN/Inf) or ``"raise"``.
        seed: seeds head growth (new rows are initialised from it, so a restored learner grows the same).
    """

    replay: Literal["input", "latent"] = "input"
    replay_batch_size: int = 32
    replay_steps: int = 1
    recipe: Recipe = "er"
    der_alpha: float = 0.3
    der_beta: float = 3.2
    grow_head: bool = True
    max_classes: int = 1000
    on_nonfinite: Literal["skip", "raise"] = "skip"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.replay not in ("input", "latent"):
            raise ConfigError(f"LearnerConfig.replay must be 'input' or 'latent', got {self.replay!r}")
        for name in ("replay_batch_size", "replay_steps", "max_classes"):
            _positive_int("LearnerConfig", name, getattr(self, name))
        if self.recipe not in RECIPES:
            raise UnknownNameError("recipe", self.recipe, RECIPES)
        _weight("LearnerConfig", "der_alpha", self.der_alpha)
        _weight("LearnerConfig", "der_beta", self.der_beta)
        if not isinstance(self.grow_head, bool):
            raise ConfigError(f"LearnerConfig.grow_head must be a bool, got {self.grow_head!r}")
        if self.on_nonfinite not in ("skip", "raise"):
            raise ConfigError(
                f"LearnerConfig.on_nonfinite must be 'skip' or 'raise', got {self.on_nonfinite!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"LearnerConfig.seed must be an int, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LearnerState:
    """Counters and running metrics (saved with the learner).

    Attributes:
        samples_seen: stream position: samples passed to :meth:`Learner.observe` (skipped ones included).
        trained_samples: new samples trained on (replayed ones not counted).
        correct: prequential hits: new samples classified right before the update.
        train_seconds: wall time spent in :meth:`Learner.observe`.
        accuracy_matrix / baseline: rows recorded with :meth:`Learner.record_accuracies`.
    """

    samples_seen: int = 0
    trained_samples: int = 0
    batches: int = 0
    optimizer_steps: int = 0
    skipped_batches: int = 0
    experiences: int = 0
    correct: int = 0
    drifts: int = 0
    train_seconds: float = 0.0
    lr_boost_factor: float = 1.0
    lr_boost_remaining: int = 0
    accuracy_matrix: list[list[float]] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)

    @property
    def prequential_accuracy(self) -> float:
        """Share of new samples classified right before training on them."""
        return self.correct / self.trained_samples if self.trained_samples else 0.0

    @property
    def samples_per_second(self) -> float:
        """New samples trained per second of :meth:`Learner.observe` (replay steps included)."""
        return self.trained_samples / self.train_seconds if self.train_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ObserveResult:
    """One :meth:`Learner.observe`: prequential loss/accuracy of the new batch (None when skipped)."""

    samples: int
    loss: float | None
    accuracy: float | None
    skipped: bool = False
    reason: str | None = None
    grown_to: int | None = None
    drift: bool = False


@dataclass(frozen=True)
class DriftEvent:
    """A change the drift detector reported: at which stream position, on which value."""

    position: int
    value: float
    detector: str
    count: int


DriftHook = Callable[[DriftEvent, "Learner"], None]


class LogDrift:
    """Drift hook: log the event at WARNING."""

    def __call__(self, event: DriftEvent, learner: Learner) -> None:
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
        _positive_int("BoostLR", "batches", self.batches)

    def __call__(self, event: DriftEvent, learner: Learner) -> None:
        learner.boost_lr(self.factor, self.batches)


@dataclass(frozen=True)
class SnapshotOnDrift:
    """Drift hook: save the learner to ``directory/drift-<position>.safetensors`` (atomically)."""

    directory: str

    def __call__(self, event: DriftEvent, learner: Learner) -> None:
        path = Path(self.directory) / f"drift-{event.position:09d}.safetensors"
        learner.save(path, extra={"drift": asdict(event)})
        logger.info("drift snapshot written to %s", path)


class Learner:
    """Continual learning on a stream of ``(x, y)`` for a prepared model.

    Args:
        model: from :func:`ondevice.prepare`; a zoo :class:`~ondevice.models.ClassifierModel` inside for
            head growth and latent replay.
        optimizer: ``"sgd"``, ``"adam"``, an :class:`~ondevice.optim.OptimizerConfig` or its dict.
        lr, momentum: override the optimizer config's fields.
        buffer: a replay buffer (None: no replay).
        regularizer: :class:`~ondevice.continual.regularizers.LwF`, :class:`OnlineEWC` or None.
        drift: a drift detector fed the prequential loss of every batch (None: no detection).
        on_drift: hooks called on each detected drift (:class:`LogDrift`, :class:`BoostLR`,
            :class:`SnapshotOnDrift` or any ``hook(event, learner)``).
        config: a :class:`LearnerConfig`.
    """

    def __init__(
        self,
        model: PreparedModel,
        *,
        optimizer: OptimizerConfig | str | dict[str, Any] = "sgd",
        lr: float | None = None,
        momentum: float | None = None,
        buffer: ReplayBuffer | None = None,
        regularizer: Regularizer | None = None,
        drift: DriftDetector | None = None,
        on_drift: Sequence[DriftHook] = (),
        config: LearnerConfig | None = None,
    ) -> None:
        if not isinstance(model, PreparedModel):
            raise ConfigError(
                f"Learner needs a model from ondevice.prepare(), got {type(model).__name__}; "
                f"call ondevice.prepare(model, scheme) first"
            )
        self.model = model
        self.config = config or LearnerConfig()
        self.optimizer_config = resolve_optimizer(optimizer, lr=lr, momentum=momentum)
        self.buffer = buffer
        self.regularizer = regularizer
        self.drift = drift
        self.on_drift: list[DriftHook] = list(on_drift)
        self.state = LearnerState()
        self.split: LatentSplit | None = None
        if self.config.replay == "latent":
            if buffer is None:
                raise ConfigError("latent replay needs a replay buffer; pass buffer=ReservoirBuffer(...)")
            self.split = split_model(model.model, trainable_buffers=tuple(model.trainable_buffers()))
            logger.info(
                "latent replay at features[%d] of %s", self.split.boundary, type(model.model).__name__
            )
        self._params = model.trainable_parameters()
        self.optimizer = build_optimizer(self.optimizer_config, self._params.values())

    # -- what it is ------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Rows of the classifier head."""
        return int(self._head().out_features)

    @property
    def samples_seen(self) -> int:
        """Stream position: samples observed so far (skip this many when resuming a stream)."""
        return self.state.samples_seen

    @property
    def buffer_bytes(self) -> int:
        """Bytes held by the replay buffer (0 without one); they count toward the memory budget."""
        return self.buffer.buffer_bytes if self.buffer is not None else 0

    @property
    def lr(self) -> float:
        """Current learning rate (boosted after a drift, if a hook did so)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def _head(self) -> nn.Linear:
        if self.model.head is None:
            raise ConfigError("the prepared model has no classifier head; pass head=... to ondevice.prepare")
        head = self.model.model.get_submodule(self.model.head)
        if not isinstance(head, nn.Linear):
            raise ConfigError(
                f"the head {self.model.head!r} is a {type(head).__name__}; the learner needs a Linear head"
            )
        return head

    # -- predicting ------------------------------------------------------------------------------------
    def _as_batch(self, x: Any, y: Any | None = None) -> tuple[Tensor, Tensor | None]:
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            raise InputDtypeError(f"inputs must be floating point, got {x.dtype}; convert with x.float()")
        x = x.to(self.model.dtype)
        ndim = self.model.input_spec.ndim
        single = ndim is not None and x.dim() == ndim - 1
        if y is None:
            return (x.unsqueeze(0) if single else x), None
        y = torch.as_tensor(y)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise InputDtypeError(f"labels must be integers (class indices), got {y.dtype}; use y.long()")
        y = y.to(torch.int64)
        if y.dim() == 0:
            if ndim is not None and not single:
                raise InputShapeError(
                    f"a scalar label goes with one sample of {ndim - 1} dims, got x of shape {tuple(x.shape)}"
                )
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        elif single:
            raise InputShapeError(
                f"x of shape {tuple(x.shape)} is one sample but y has shape {tuple(y.shape)}"
            )
        if y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise InputShapeError(
                f"labels must be 1-D with one label per sample: x has shape {tuple(x.shape)}, y has shape "
                f"{tuple(y.shape)}"
            )
        return x, y

    @torch.no_grad()
    def logits(self, x: Any) -> Tensor:
        """Logits for one sample or a batch (eval mode; the model's mode is restored after)."""
        batch, _ = self._as_batch(x)
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model(batch)
        finally:
            self.model.train(was_training)

    def predict(self, x: Any) -> Tensor:
        """Predicted class indices, shape ``(N,)`` (``(1,)`` for one sample), at any moment."""
        return self.logits(x).argmax(dim=-1)

    @torch.no_grad()
    def accuracy(self, data: Any, *, batch_size: int = 256) -> float:
        """Top-1 accuracy on ``data`` (anything ``ondevice.data.as_stream`` takes); labels the head has
        no row for count as errors."""
        from ondevice.data import as_stream

        correct = total = 0
        for x, y in as_stream(data, batch_size=batch_size):
            correct += int((self.predict(x) == y).sum())
            total += int(y.numel())
        if total == 0:
            raise ConfigError("cannot measure accuracy on empty data")
        return correct / total

    # -- learning --------------------------------------------------------------------------------------
    def observe(self, x: Any, y: Any) -> ObserveResult:
        """Learn from one sample (``x`` without batch dim, ``y`` a scalar) or a small batch."""
        started = time.perf_counter()
        try:
            return self._observe(x, y)
        finally:
            self.state.train_seconds += time.perf_counter() - started

    def _observe(self, x_in: Any, y_in: Any) -> ObserveResult:
        x, y = self._as_batch(x_in, y_in)
        assert y is not None
        self.model.input_spec.check(x, dtype=self.model.dtype)
        n = int(y.shape[0])
        self.state.samples_seen += n
        if n == 0:
            return ObserveResult(0, None, None, skipped=True, reason="empty")
        if not bool(torch.isfinite(x).all()):
            return self._skip("nonfinite_input", n)
        low, high = int(y.min()), int(y.max())
        if low < 0:
            raise InputShapeError(f"labels must be >= 0, got {low}")
        grown_to = None
        if high >= self.num_classes:
            if not self.config.grow_head:
                raise InputShapeError(
                    f"label {high} but the head has {self.num_classes} outputs; create the learner with "
                    f"LearnerConfig(grow_head=True) or remap the labels"
                )
            if high >= self.config.max_classes:
                raise InputShapeError(
                    f"label {high} would grow the head beyond LearnerConfig.max_classes="
                    f"{self.config.max_classes}; raise it or check the labels"
                )
            self.grow_head(high + 1)
            grown_to = high + 1
        self.model.train()
        latent = self.split.front(x) if self.split is not None else None
        new_input = latent if latent is not None else x
        hits, loss_value, stored_logits = 0, 0.0, None
        for step in range(self.config.replay_steps):
            replay = self._draw()
            if step > 0 and self.config.recipe == "once":
                if replay is None:
                    break
                replay_logits = self._forward(replay.x)
                reg_x = replay.x if self.split is None else None
                self._train_step(
                    self._replay_loss(replay_logits, replay), reg_x, replay_logits, int(replay.y.shape[0])
                )
                continue
            inputs = new_input if replay is None else torch.cat([new_input, replay.x])
            logits = self._forward(inputs)
            new_logits = logits[:n]
            new_loss = F.cross_entropy(new_logits, y)
            if step == 0:
                # Prequential: the new batch is scored before any update on it.
                if not bool(torch.isfinite(new_loss)):
                    return self._skip("nonfinite_loss", n)
                hits = int((new_logits.detach().argmax(-1) == y).sum())
                loss_value = float(new_loss.detach())
                stored_logits = new_logits.detach()
            task_loss = self._task_loss(logits, y, replay, n)
            if not self._train_step(task_loss, x, new_logits, int(inputs.shape[0])):
                if step == 0:
                    return self._skip("nonfinite_gradient", n)
                break
            if step == 0 and self.config.recipe == "once" and self.buffer is not None:
                self._store(new_input, y, stored_logits)
        if self.config.recipe == "er" and self.buffer is not None:
            self._store(new_input, y, stored_logits)
        self.state.batches += 1
        self.state.trained_samples += n
        self.state.correct += hits
        drifted = self._check_drift(loss_value)
        self._tick_lr_boost()
        return ObserveResult(n, loss_value, hits / n, grown_to=grown_to, drift=drifted)

    def _task_loss(self, logits: Tensor, y: Tensor, replay: ReplayDraw | None, n: int) -> Tensor:
        """ER: cross-entropy over new and replayed samples together; DER++: new CE plus the replay terms."""
        if replay is None:
            return F.cross_entropy(logits[:n], y)
        if replay.logits is None:
            return F.cross_entropy(logits, torch.cat([y, replay.y]))
        return F.cross_entropy(logits[:n], y) + self._replay_loss(logits[n:], replay)

    def _replay_loss(self, logits: Tensor, replay: ReplayDraw) -> Tensor:
        """Loss on replayed samples alone: CE for ER; ``beta * CE + alpha * masked MSE`` for DER++."""
        if replay.logits is None or replay.logit_mask is None:
            return F.cross_entropy(logits, replay.y)
        width = min(int(logits.shape[1]), int(replay.logits.shape[1]))
        mask = replay.logit_mask[:, :width].to(logits.dtype)
        squared = (logits[:, :width] - replay.logits[:, :width].to(logits.dtype)).pow(2) * mask
        mse = squared.sum() / mask.sum().clamp_min(1.0)
        return self.config.der_beta * F.cross_entropy(logits, replay.y) + self.config.der_alpha * mse

    def _store(self, inputs: Tensor, y: Tensor, logits: Tensor | None) -> None:
        assert self.buffer is not None
        self.buffer.add(inputs, y, logits if self.buffer.config.logits else None)

    def _draw(self) -> ReplayDraw | None:
        if self.buffer is None or len(self.buffer) == 0:
            return None
        draw = self.buffer.draw(self.config.replay_batch_size)
        return ReplayDraw(draw.x.to(self.model.dtype), draw.y, draw.logits, draw.logit_mask)

    def _forward(self, inputs: Tensor) -> Tensor:
        if self.split is not None:
            return self.split.tail(inputs)
        return self.model.model(inputs)

    def _train_step(self, task_loss: Tensor, x: Tensor | None, logits: Tensor, batch_size: int) -> bool:
        loss = task_loss
        if self.regularizer is not None:
            extra = self.regularizer.loss(self.model.model, x, logits)
            if extra is not None:
                loss = loss + extra
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self._params.values()):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        if self.regularizer is not None:
            self.regularizer.after_backward(self._params, batch_size)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.optimizer_steps += 1
        return True

    def _skip(self, reason: str, n: int) -> ObserveResult:
        if self.config.on_nonfinite == "raise":
            raise NonFiniteBatchError(
                f"batch of {n} samples rejected: {reason.replace('_', ' ')}; clean the data or use "
                f"LearnerConfig(on_nonfinite='skip')"
            )
        self.state.skipped_batches += 1
        logger.warning("skipped a batch of %d samples: %s", n, reason)
        return ObserveResult(n, None, None, skipped=True, reason=reason)

    def learn(
        self,
        stream: Iterable[Any],
        *,
        skip: int = 0,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 0,
        on_result: Callable[[ObserveResult], None] | None = None,
    ) -> int:
        """Observe every ``(x, y)`` item of ``stream`` (single samples or batches); returns samples observed.

        This is the seam for any source: an in-memory :class:`~ondevice.data.Stream`, a generator reading
        a sensor, a serial line. ``skip`` drops the stream's first samples (pass ``learner.samples_seen``
        after a restore to continue where the checkpoint stopped); with ``checkpoint`` the learner saves
        itself there every ``checkpoint_every`` batches and at the end.
        """
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
            raise ConfigError(f"skip must be an int >= 0, got {skip!r}")
        if (
            isinstance(checkpoint_every, bool)
            or not isinstance(checkpoint_every, int)
            or checkpoint_every < 0
        ):
            raise ConfigError(f"checkpoint_every must be an int >= 0, got {checkpoint_every!r}")
        position = 0
        observed = 0
        batches = 0
        for item in stream:
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise ConfigError(f"a stream item must be an (x, y) pair, got {type(item).__name__}")
            x, y = self._as_batch(item[0], item[1])
            assert y is not None
            n = int(y.shape[0])
            if position + n <= skip:
                position += n
                continue
            if position < skip:
                x, y = x[skip - position :], y[skip - position :]
            position += n
            result = self.observe(x, y)
            observed += result.samples
            batches += 1
            if on_result is not None:
                on_result(result)
            if checkpoint is not None and checkpoint_every and batches % checkpoint_every == 0:
                self.save(checkpoint)
        if checkpoint is not None:
            self.save(checkpoint)
        return observed

    def end_experience(self) -> None:
        """Mark an experience boundary: LwF snapshots its teacher, online EWC consolidates."""
        if self.regularizer is not None:
            self.regularizer.end_experience(self.model.model, self.model.trainable_tensors())
        self.state.experiences += 1

    def record_accuracies(self, row: Sequence[float], *, baseline: bool = False) -> None:
        """Append a row ``R[i][:]`` of the accuracy matrix (or set the baseline ``b``); saved in the state."""
        values = [float(v) for v in row]
        if baseline:
            self.state.baseline = values
        else:
            self.state.accuracy_matrix.append(values)

    # -- head growth ---------------------------------------------------------------------------------------
    def grow_head(self, num_classes: int) -> bool:
        """Grow the head to ``num_classes`` rows keeping the old ones; True if it grew.

        The new rows are initialised from ``LearnerConfig.seed`` (so a restored learner grows identically),
        a memory-saving head stays one, the optimizer is rebuilt with every tensor's state carried over
        (the grown tensors' state zero-padded) and the regulariser's state is padded likewise.
        """
        from ondevice.models import ClassifierModel

        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
        inner = self.model.model
        if num_classes <= self.num_classes:
            return False
        if not isinstance(inner, ClassifierModel) or self.model.head != "classifier":
            raise ConfigError(
                f"growing the head needs a zoo ClassifierModel whose head is 'classifier', got "
                f"{type(inner).__name__} with head {self.model.head!r}; size the head up front with "
                f"replace_head(n) and use LearnerConfig(grow_head=False)"
            )
        old_head = self._head()
        old_params = dict(self._params)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed * 1_000_003 + num_classes)
            new_head = inner.grow_head(num_classes)
        if type(old_head) is not nn.Linear:
            setattr(inner, "classifier", self.model.with_ops(new_head))  # noqa: B010  (a wrapped head, not a Linear)
        self._params = self.model.trainable_parameters()
        grown = {
            name: tuple(p.shape)
            for name, p in self._params.items()
            if name in old_params and tuple(old_params[name].shape) != tuple(p.shape)
        }
        self._rebuild_optimizer(old_params)
        if self.regularizer is not None:
            self.regularizer.resize(grown)
        logger.info("grew the head from %d to %d classes", old_head.out_features, num_classes)
        return True

    def _rebuild_optimizer(self, old_params: dict[str, nn.Parameter]) -> None:
        lr = self.lr
        old_state = self.optimizer.state
        optimizer = build_optimizer(self.optimizer_config, self._params.values())
        for group in optimizer.param_groups:
            group["lr"] = lr
        for name, param in self._params.items():
            old = old_params.get(name)
            if old is None or old not in old_state:
                continue
            carried: dict[str, Any] = {}
            for key, value in old_state[old].items():
                if isinstance(value, Tensor) and value.dim() > 0 and tuple(value.shape) == tuple(old.shape):
                    padded = torch.zeros_like(param.detach())
                    padded[: value.shape[0]] = value
                    carried[key] = padded
                else:
                    carried[key] = value
            optimizer.state[param] = carried
        self.optimizer = optimizer

    # -- drift -----------------------------------------------------------------------------------------
    def _check_drift(self, value: float) -> bool:
        if self.drift is None or not math.isfinite(value) or not self.drift.update(value):
            return False
        self.state.drifts += 1
        event = DriftEvent(self.state.samples_seen, value, self.drift.kind, self.state.drifts)
        for hook in self.on_drift:
            hook(event, self)
        return True

    def boost_lr(self, factor: float, batches: int) -> None:
        """Multiply the learning rate by ``factor`` for the next ``batches`` observed batches."""
        if not factor > 0 or batches < 1:
            raise ConfigError(f"boost_lr needs factor > 0 and batches >= 1, got {factor!r}, {batches!r}")
        base = self.optimizer_config.lr
        for group in self.optimizer.param_groups:
            group["lr"] = base * factor
        self.state.lr_boost_factor = float(factor)
        self.state.lr_boost_remaining = int(batches)

    def _tick_lr_boost(self) -> None:
        if self.state.lr_boost_remaining <= 0:
            return
        self.state.lr_boost_remaining -= 1
        if self.state.lr_boost_remaining == 0:
            for group in self.optimizer.param_groups:
                group["lr"] = self.optimizer_config.lr
            self.state.lr_boost_factor = 1.0

    # -- state -----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], *, extra: dict[str, Any] | None = None) -> Path:
        """Save the whole state (delta, head, optimizer, buffer, regulariser, drift, metrics) atomically."""
        from ondevice.continual.state import save_learner

        return save_learner(self, path, extra=extra)

    def load(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Load a state saved by :meth:`save` into this learner (validated); returns the ``extra`` dict.

        Raises:
            CheckpointError: the file is missing, truncated or corrupt.
            CheckpointMismatchError: it belongs to another model, scheme or learner set-up.
        """
        from ondevice.continual.state import load_learner

        return load_learner(self, path)

    @classmethod
    def restore(
        cls, path: str | os.PathLike[str], model: PreparedModel, *, on_drift: Sequence[DriftHook] = ()
    ) -> Learner:
        """A learner rebuilt from a checkpoint for ``model`` (prepared like the one that was saved).

        The buffer, regulariser, drift detector, optimizer and learner settings come from the checkpoint;
        hooks are code, so pass them again.
        """
        from ondevice.continual.state import restore_learner

        return restore_learner(path, model, on_drift=on_drift)


def create_learner(
    model: PreparedModel,
    strategy: Strategy | str = "replay",
    *,
    buffer_size: int | None = 200,
    buffer_bytes: int | None = None,
    bits: Literal[8, 32] | None = None,
    policy: Literal["reservoir", "class_balanced"] = "class_balanced",
    optimizer: OptimizerConfig | str | dict[str, Any] = "sgd",
    lr: float | None = None,
    temperature: float = 2.0,
    lwf_weight: float = 1.0,
    ewc_lambda: float = 100.0,
    drift: DriftDetector | None = None,
    on_drift: Sequence[DriftHook] = (),
    config: LearnerConfig | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> Learner:
    """A :class:`Learner` for a named strategy.

    - ``"naive"``: plain fine-tuning on the stream (the lower bound; forgets catastrophically).
    - ``"replay"``: experience replay of raw inputs from a buffer of ``buffer_size`` samples (or
      ``buffer_bytes``), ``policy`` class-balanced or reservoir; recipe and steps in ``config``.
    - ``"der"``: DER++, replay whose buffer also keeps each sample's logits (``LearnerConfig.der_alpha``,
      ``der_beta``); ``"latent-der"`` does the same on latents.
    - ``"latent-replay"``: replay of activations at the frozen front's boundary, 8-bit by default.
    - ``"lwf"``: Learning without Forgetting, no buffer.
    - ``"ewc"``: online EWC, no buffer.

    ``num_classes`` sizes the head up front when the number of classes is known (it then never needs
    to grow); by default it grows as labels arrive.
    """
    if strategy not in STRATEGIES:
        raise UnknownNameError("strategy", strategy, STRATEGIES)
    base = config or LearnerConfig(seed=seed)
    buffer: ReplayBuffer | None = None
    regularizer: Regularizer | None = None
    if strategy in ("replay", "latent-replay", "der", "latent-der"):
        cls = ClassBalancedBuffer if policy == "class_balanced" else ReservoirBuffer
        if policy not in ("class_balanced", "reservoir"):
            raise UnknownNameError("buffer policy", policy, ("class_balanced", "reservoir"))
        latent_replay = strategy.startswith("latent-")
        width = bits if bits is not None else (8 if latent_replay else 32)
        size = None if buffer_bytes is not None else buffer_size
        buffer = cls(
            size, capacity_bytes=buffer_bytes, bits=width, seed=seed, logits=strategy.endswith("der")
        )
        replay: Literal["input", "latent"] = "latent" if latent_replay else "input"
        base = LearnerConfig(**{**base.to_dict(), "replay": replay})
    elif strategy == "lwf":
        regularizer = LwF(temperature, lwf_weight)
    elif strategy == "ewc":
        regularizer = OnlineEWC(ewc_lambda)
    learner = Learner(
        model,
        optimizer=optimizer,
        lr=lr,
        buffer=buffer,
        regularizer=regularizer,
        drift=drift,
        on_drift=on_drift,
        config=base,
    )
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
        if num_classes < learner.num_classes:
            raise ConfigError(
                f"num_classes={num_classes} is smaller than the model's head ({learner.num_classes} "
                f"classes); pass at least {learner.num_classes} or replace the head first"
            )
        learner.grow_head(num_classes)
    return learner
