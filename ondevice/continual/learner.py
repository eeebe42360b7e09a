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

The pieces live beside this module: settings (:mod:`~ondevice.continual.config`), counters and
prequential scoring (:mod:`~ondevice.continual.prequential`), input coercion
(:mod:`~ondevice.continual.inputs`), replay draws and losses (:mod:`~ondevice.continual.replay`), head
growth (:mod:`~ondevice.continual.head`), drift hooks (:mod:`~ondevice.continual.hooks`) and the named
strategies :func:`create_learner` builds (:mod:`~ondevice.continual.strategies`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from ondevice.continual._state_dict import check_state, learner_settings
from ondevice.continual.buffer import BufferConfig, ReplayBuffer, buffer_from_config
from ondevice.continual.config import RECIPES, LearnerConfig, Recipe
from ondevice.continual.drift import DriftDetector
from ondevice.continual.head import grow_classifier, grown_shapes, linear_head, rebuild_optimizer
from ondevice.continual.hooks import BoostLR, DriftEvent, LogDrift, SnapshotOnDrift
from ondevice.continual.inputs import as_batch, stream_batches
from ondevice.continual.latent import LatentSplit, split_model
from ondevice.continual.prequential import LearnerState, ObserveResult, count_hits
from ondevice.continual.regularizers import Regularizer
from ondevice.continual.replay import draw_replay, replay_loss, store_samples, task_loss
from ondevice.continual.state import load_learner, read_learner_state, save_learner
from ondevice.continual.strategies import STRATEGIES, RegularizerOptions, Strategy, strategy_recipe
from ondevice.data import as_stream
from ondevice.errors import ConfigError, InputShapeError, NonFiniteBatchError
from ondevice.loop import optimizer_step
from ondevice.optim import OptimizerConfig, build_optimizer, encode_optimizer_state, resolve_optimizer
from ondevice.prepared import PreparedModel

__all__ = [
    "RECIPES",
    "STRATEGIES",
    "BoostLR",
    "DriftEvent",
    "DriftHook",
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

DriftHook = Callable[[DriftEvent, "Learner"], None]
"""A drift hook, called as ``hook(event, learner)`` on each drift (:mod:`~ondevice.continual.hooks`)."""


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
        return int(linear_head(self.model).out_features)

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

    # -- predicting ------------------------------------------------------------------------------------
    def _as_batch(self, x: Any, y: Any | None = None) -> tuple[Tensor, Tensor | None]:
        return as_batch(x, y, dtype=self.model.dtype, ndim=self.model.input_spec.ndim)

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
        correct = total = 0
        for x, y in as_stream(data, batch_size=batch_size):
            correct += count_hits(self.logits(x), y)
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
        grown_to = self._grow_for_labels(y)
        self.model.train()
        latent = self.split.front(x) if self.split is not None else None
        new_input = latent if latent is not None else x
        hits, loss_value, stored_logits = 0, 0.0, None
        for step in range(self.config.replay_steps):
            replay = draw_replay(self.buffer, self.config.replay_batch_size, self.model.dtype)
            if step > 0 and self.config.recipe == "once":
                if replay is None:
                    break
                replay_logits = self._forward(replay.x)
                reg_x = replay.x if self.split is None else None
                replayed = replay_loss(
                    replay_logits, replay, der_alpha=self.config.der_alpha, der_beta=self.config.der_beta
                )
                self._train_step(replayed, reg_x, replay_logits, int(replay.y.shape[0]))
                continue
            inputs = new_input if replay is None else torch.cat([new_input, replay.x])
            logits = self._forward(inputs)
            new_logits = logits[:n]
            new_loss = F.cross_entropy(new_logits, y)
            if step == 0:
                # Prequential: the new batch is scored before any update on it.
                if not bool(torch.isfinite(new_loss)):
                    return self._skip("nonfinite_loss", n)
                hits = count_hits(new_logits, y)
                loss_value = float(new_loss.detach())
                stored_logits = new_logits.detach()
            loss = task_loss(
                logits, y, replay, n, der_alpha=self.config.der_alpha, der_beta=self.config.der_beta
            )
            if not self._train_step(loss, x, new_logits, int(inputs.shape[0])):
                if step == 0:
                    return self._skip("nonfinite_gradient", n)
                break
            if step == 0 and self.config.recipe == "once" and self.buffer is not None:
                store_samples(self.buffer, new_input, y, stored_logits)
        if self.config.recipe == "er" and self.buffer is not None:
            store_samples(self.buffer, new_input, y, stored_logits)
        self.state.batches += 1
        self.state.trained_samples += n
        self.state.correct += hits
        drifted = self._check_drift(loss_value)
        self._tick_lr_boost()
        return ObserveResult(n, loss_value, hits / n, grown_to=grown_to, drift=drifted)

    def _grow_for_labels(self, y: Tensor) -> int | None:
        """Grow the head for labels it has no row for (as the config allows); the new size, if it grew."""
        low, high = int(y.min()), int(y.max())
        if low < 0:
            raise InputShapeError(f"labels must be >= 0, got {low}")
        if high < self.num_classes:
            return None
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
        return high + 1

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
        regularizer = self.regularizer

        def correct_gradients() -> None:  # e.g. online EWC's Fisher update, after the gradient check
            if regularizer is not None:
                regularizer.after_backward(self._params, batch_size)

        self.optimizer.zero_grad(set_to_none=True)
        if not optimizer_step(
            loss, self.optimizer, check=self._params.values(), before_step=correct_gradients
        ):
            return False
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
        observed = 0
        batches = stream_batches(stream, skip=skip, dtype=self.model.dtype, ndim=self.model.input_spec.ndim)
        for count, (x, y) in enumerate(batches, start=1):
            result = self.observe(x, y)
            observed += result.samples
            if on_result is not None:
                on_result(result)
            if checkpoint is not None and checkpoint_every and count % checkpoint_every == 0:
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
        (the grown tensors' state zero-padded) and the regulariser's state is padded likewise
        (:mod:`ondevice.continual.head`).
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
        old_classes = self.num_classes
        if num_classes <= old_classes:
            return False
        grow_classifier(self.model, num_classes, seed=self.config.seed)
        old_params = self._params
        self._params = self.model.trainable_parameters()
        self.optimizer = rebuild_optimizer(
            self.optimizer, self.optimizer_config, self._params, old_params, lr=self.lr
        )
        if self.regularizer is not None:
            self.regularizer.resize(grown_shapes(old_params, self._params))
        logger.info("grew the head from %d to %d classes", old_classes, num_classes)
        return True

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
        self._set_lr(self.optimizer_config.lr * factor)
        self.state.lr_boost_factor = float(factor)
        self.state.lr_boost_remaining = int(batches)

    def _tick_lr_boost(self) -> None:
        if self.state.lr_boost_remaining <= 0:
            return
        self.state.lr_boost_remaining -= 1
        if self.state.lr_boost_remaining == 0:
            self._set_lr(self.optimizer_config.lr)
            self.state.lr_boost_factor = 1.0

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The whole state as ``(tensors, metadata)``: live tensors by prefix (``delta/``, ``optim/``,
        ``buffer/``, ``reg/``; clone them to keep a snapshot) and JSON-serialisable metadata (settings,
        counters, drift detector). :func:`ondevice.continual.state.snapshot_learner` copies it for a file.
        """
        tensors: dict[str, Tensor] = {f"delta/{k}": v for k, v in self.model.trainable_tensors().items()}
        optim_tensors, scalars = encode_optimizer_state(self.optimizer, self._params)
        tensors.update(optim_tensors)
        metadata: dict[str, Any] = {
            "delta": self.model.delta_metadata(),
            "head": self.model.head,
            "num_classes": self.num_classes,
            "config": self.config.to_dict(),
            "optimizer": {"config": self.optimizer_config.to_dict(), "scalars": scalars, "lr": self.lr},
            "state": self.state.to_dict(),
            "buffer": None,
            "regularizer": None,
            "drift": self.drift.to_dict() if self.drift is not None else None,
        }
        if self.buffer is not None:
            tensors.update({f"buffer/{k}": v for k, v in self.buffer.state_tensors().items()})
            metadata["buffer"] = self.buffer.state_metadata()
        if self.regularizer is not None:
            tensors.update({f"reg/{k}": v for k, v in self.regularizer.state_tensors().items()})
            metadata["regularizer"] = self.regularizer.state_metadata()
        return tensors, metadata

    def load_state_dict(
        self, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any], *, source: str = "state dict"
    ) -> None:
        """Load a :meth:`state_dict` (the current format; files go through :meth:`load`), validating the
        whole state first: a refusal leaves the learner as it was.

        Raises:
            CheckpointError: malformed settings or counters.
            CheckpointMismatchError: it belongs to another model, scheme or learner set-up.
        """
        checked = check_state(
            tensors,
            metadata,
            model=self.model,
            config=self.config,
            optimizer_config=self.optimizer_config,
            params=self._params,
            buffer=self.buffer,
            regularizer=self.regularizer,
            drift=self.drift,
            source=source,
        )
        # Everything is valid: copy it in.
        if checked.num_classes > self.num_classes:
            self.grow_head(checked.num_classes)
        self.model.load_trainable(checked.delta)
        self.optimizer.state.clear()
        for name, slots in checked.optimizer_slots.items():
            self.optimizer.state[self._params[name]] = slots
        self._set_lr(checked.lr)
        if checked.buffer is not None and self.buffer is not None:
            vars(self.buffer).update(vars(checked.buffer))
        if checked.regularizer is not None and self.regularizer is not None:
            vars(self.regularizer).update(vars(checked.regularizer))
        if checked.drift is not None:
            self.drift = checked.drift
        self.state = checked.counters
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, path: str | os.PathLike[str], *, extra: dict[str, Any] | None = None) -> Path:
        """Save the whole state (delta, head, optimizer, buffer, regulariser, drift, metrics) atomically."""
        return save_learner(self, path, extra=extra)

    def load(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Load a state saved by :meth:`save` into this learner (validated); returns the ``extra`` dict.

        Raises:
            CheckpointError: the file is missing, truncated or corrupt.
            CheckpointMismatchError: it belongs to another model, scheme or learner set-up.
        """
        return load_learner(self, path)

    @classmethod
    def restore(
        cls, path: str | os.PathLike[str], model: PreparedModel, *, on_drift: Sequence[DriftHook] = ()
    ) -> Learner:
        """A learner rebuilt from a checkpoint for ``model`` (prepared like the one that was saved).

        The buffer, regulariser, drift detector, optimizer and learner settings come from the checkpoint;
        hooks are code, so pass them again.
        """
        tensors, metadata = read_learner_state(path)
        source = f"checkpoint {str(path)!r}"
        model.check_delta_metadata(metadata.get("delta") or {}, source=source)
        settings = learner_settings(metadata, source)
        learner = cls(
            model,
            optimizer=settings.optimizer,
            buffer=settings.buffer,
            regularizer=settings.regularizer,
            drift=settings.drift,
            on_drift=on_drift,
            config=settings.config,
        )
        learner.load_state_dict(tensors, metadata, source=source)
        return learner


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
    """A :class:`Learner` for a named strategy (declared in
    :data:`~ondevice.continual.strategies.STRATEGY_RECIPES`).

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
    recipe = strategy_recipe(strategy)
    base = config or LearnerConfig(seed=seed)
    buffer: ReplayBuffer | None = None
    if recipe.replay is not None:
        buffer = buffer_from_config(
            BufferConfig(
                policy=policy,
                capacity=None if buffer_bytes is not None else buffer_size,
                capacity_bytes=buffer_bytes,
                bits=bits if bits is not None else recipe.default_bits,
                seed=seed,
                logits=recipe.logits,
            )
        )
        base = dataclasses.replace(base, replay=recipe.replay)
    regularizer = None
    if recipe.regularizer is not None:
        regularizer = recipe.regularizer(RegularizerOptions(temperature, lwf_weight, ewc_lambda))
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
