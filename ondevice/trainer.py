"""``ondevice.Trainer``: train a prepared model on mini-batches from any stream.

The trainer validates every batch before it touches the weights: a batch with NaN/Inf inputs, a
non-finite loss or non-finite gradients is skipped and counted (weights and optimizer state untouched),
wrong shapes, dtypes or labels raise a clear :class:`~ondevice.errors.OnDeviceError`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ondevice.checkpoint import KIND_TRAINER, read_tensors, write_tensors
from ondevice.data import Stream, as_stream
from ondevice.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    InputDtypeError,
    InputShapeError,
    NonFiniteBatchError,
)
from ondevice.loop import optimizer_step
from ondevice.optim import (
    OPTIMIZER_PREFIX,
    OptimizerConfig,
    build_optimizer,
    decode_optimizer_state,
    encode_optimizer_state,
    resolve_optimizer,
)
from ondevice.prepared import PreparedModel

__all__ = ["EvalResult", "FitResult", "StepResult", "Trainer", "TrainerState", "logits_of"]

logger = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor], Tensor]
_LEGACY_PREFIX = "optimizer/"  # the Trainer's own optimizer-state prefix before the shared codec


@dataclass(frozen=True)
class StepResult:
    """One mini-batch: its loss (None when skipped), whether it was skipped and why, and whether the
    optimizer stepped (with gradient accumulation it steps every ``accumulate_steps`` batches)."""

    loss: float | None
    skipped: bool
    reason: str | None
    optimizer_stepped: bool


@dataclass(frozen=True)
class FitResult:
    """Summary of :meth:`Trainer.fit`."""

    epochs: int
    batches: int
    samples: int
    optimizer_steps: int
    skipped_batches: int
    epoch_losses: tuple[float, ...]
    seconds: float
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    """Skipped batches of this fit by reason: ``nonfinite_input``, ``nonfinite_loss`` or
    ``nonfinite_gradient`` (their sum is ``skipped_batches``)."""

    @property
    def final_loss(self) -> float:
        return self.epoch_losses[-1] if self.epoch_losses else float("nan")


@dataclass(frozen=True)
class EvalResult:
    """Accuracy and mean cross-entropy over ``samples`` samples."""

    accuracy: float
    loss: float
    samples: int


@dataclass
class TrainerState:
    """Counters a checkpoint carries."""

    batches: int = 0
    samples: int = 0
    optimizer_steps: int = 0
    skipped_batches: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)


class Trainer:
    """Trains a :class:`PreparedModel`.

    Args:
        model: the prepared model.
        optimizer: ``"sgd"``, ``"adam"``, an :class:`OptimizerConfig` or its dict.
        lr, momentum, weight_decay: override the optimizer config's fields.
        batch_size: mini-batch size used when ``fit`` is given a dataset rather than a stream of batches.
        accumulate_steps: gradients of this many mini-batches are summed before each optimizer step
            (each loss is divided by it, so k batches of size b train like one batch of k*b).
        loss_fn: ``loss_fn(logits, labels)``; cross-entropy by default.
        on_nonfinite: ``"skip"`` (count and skip batches with NaN/Inf) or ``"raise"``.
        progress: show a progress bar in :meth:`fit`.
    """

    def __init__(
        self,
        model: PreparedModel,
        *,
        optimizer: OptimizerConfig | str | dict[str, Any] = "sgd",
        lr: float | None = None,
        momentum: float | None = None,
        weight_decay: float | None = None,
        batch_size: int = 32,
        accumulate_steps: int = 1,
        loss_fn: LossFn | None = None,
        on_nonfinite: Literal["skip", "raise"] = "skip",
        progress: bool = False,
    ) -> None:
        if not isinstance(model, PreparedModel):
            raise ConfigError(
                f"Trainer needs a model from ondevice.prepare(), got {type(model).__name__}; "
                f"call ondevice.prepare(model, scheme) first"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        if (
            isinstance(accumulate_steps, bool)
            or not isinstance(accumulate_steps, int)
            or accumulate_steps < 1
        ):
            raise ConfigError(f"accumulate_steps must be a positive int, got {accumulate_steps!r}")
        if on_nonfinite not in ("skip", "raise"):
            raise ConfigError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        self.model = model
        self.config = resolve_optimizer(optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.batch_size = batch_size
        self.accumulate_steps = accumulate_steps
        self.loss_fn: LossFn = loss_fn or F.cross_entropy
        self.on_nonfinite = on_nonfinite
        self.progress = progress
        self.state = TrainerState()
        self._params = model.trainable_parameters()
        self.optimizer = build_optimizer(self.config, self._params.values())
        self._pending = 0  # micro-batches accumulated since the last optimizer step

    # -- one batch -----------------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> StepResult:
        """Train on one mini-batch (forward, backward, and an optimizer step when due)."""
        self.model.train()
        self._check_labels(x, y)
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            return self._skip("nonfinite_input", x)
        logits = logits_of(self.model(_as_model_dtype(x, self.model)))
        self._check_label_range(y, logits)
        loss = self.loss_fn(_loss_precision(logits), y)
        if not bool(torch.isfinite(loss)):
            return self._skip("nonfinite_loss", x)
        stepped = self._pending + 1 >= self.accumulate_steps
        if not optimizer_step(
            loss, self.optimizer, check=self._params.values(), divide_by=self.accumulate_steps, step=stepped
        ):
            self._pending = 0
            return self._skip("nonfinite_gradient", x)
        self.state.batches += 1
        self.state.samples += int(x.shape[0])
        self._pending = 0 if stepped else self._pending + 1
        self.state.optimizer_steps += int(stepped)
        return StepResult(loss=float(loss.detach()), skipped=False, reason=None, optimizer_stepped=stepped)

    def flush(self) -> bool:
        """Apply an optimizer step for gradients accumulated since the last one; True if it stepped."""
        if self._pending == 0:
            return False
        self.optimizer.step()
        self._zero_grad()
        self._pending = 0
        self.state.optimizer_steps += 1
        return True

    # -- loops ---------------------------------------------------------------------------------------
    def fit(
        self,
        data: Any,
        *,
        epochs: int = 1,
        shuffle: bool = True,
        seed: int | None = 0,
        on_step: Callable[[StepResult], None] | None = None,
    ) -> FitResult:
        """Train for ``epochs`` passes over ``data`` (anything ``ondevice.data.as_stream`` accepts)."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be a positive int, got {epochs!r}")
        start = time.perf_counter()
        reasons_before = dict(self.state.skipped_reasons)
        before = (
            self.state.batches,
            self.state.samples,
            self.state.optimizer_steps,
            self.state.skipped_batches,
        )
        epoch_losses: list[float] = []
        for epoch in range(epochs):
            stream = as_stream(
                data, batch_size=self.batch_size, shuffle=shuffle, seed=None if seed is None else seed + epoch
            )
            total = len(stream) if isinstance(stream, Stream) else None
            losses: list[float] = []
            seen = 0
            with self._progress_bar(f"epoch {epoch + 1}/{epochs}", total) as advance:
                for x, y in stream:
                    seen += 1
                    result = self.step(x, y)
                    if result.loss is not None:
                        losses.append(result.loss)
                    if on_step is not None:
                        on_step(result)
                    advance(result)
            self.flush()
            if not seen:
                what = type(data).__name__
                if epoch == 0:
                    raise ConfigError(
                        f"Trainer.fit got no batches: the {what} passed as data is empty; pass a dataset or "
                        f"stream with at least one sample"
                    )
                raise ConfigError(
                    f"Trainer.fit got no batches in epoch {epoch + 1} of {epochs}: the {what} passed as data "
                    f"can be read only once; pass a dataset, a DataLoader or a list, or use epochs=1"
                )
            epoch_losses.append(sum(losses) / len(losses) if losses else float("nan"))
        return FitResult(
            epochs=epochs,
            batches=self.state.batches - before[0],
            samples=self.state.samples - before[1],
            optimizer_steps=self.state.optimizer_steps - before[2],
            skipped_batches=self.state.skipped_batches - before[3],
            epoch_losses=tuple(epoch_losses),
            seconds=time.perf_counter() - start,
            skipped_reasons={
                reason: count - reasons_before.get(reason, 0)
                for reason, count in sorted(self.state.skipped_reasons.items())
                if count > reasons_before.get(reason, 0)
            },
        )

    @torch.no_grad()
    def evaluate(self, data: Any, *, batch_size: int = 256) -> EvalResult:
        """Accuracy and mean loss of the model on ``data`` (eval mode, no gradients)."""
        return evaluate(self.model, data, batch_size=batch_size, loss_fn=self.loss_fn)

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike[str]) -> Path:
        """Save the delta, the optimizer state and the counters to one safetensors file, atomically."""
        optim_tensors, scalars = encode_optimizer_state(self.optimizer, self._params)
        tensors: dict[str, Tensor] = {**self.model.trainable_tensors(), **optim_tensors}
        metadata = self.model.delta_metadata()
        metadata["trainer"] = {
            "optimizer": self.config.to_dict(),
            "optimizer_scalars": scalars,
            "state": {
                "batches": self.state.batches,
                "samples": self.state.samples,
                "optimizer_steps": self.state.optimizer_steps,
                "skipped_batches": self.state.skipped_batches,
                "skipped_reasons": self.state.skipped_reasons,
            },
        }
        return write_tensors(path, tensors, metadata, kind=KIND_TRAINER)

    def resume(self, path: str | os.PathLike[str]) -> None:
        """Restore what :meth:`save_checkpoint` wrote (validated against this model and scheme).

        The whole checkpoint (digest, kind, model, scheme, optimizer, every tensor) is validated before
        anything is copied, so a failed resume leaves the model, the optimizer and the counters as they
        were.

        Raises:
            CheckpointError: the file is missing, damaged, foreign or not a Trainer checkpoint.
            CheckpointMismatchError: it belongs to another model, scheme or optimizer.
        """
        tensors, metadata = read_tensors(path, kind=KIND_TRAINER)
        source = f"checkpoint {str(path)!r}"
        self.model.check_delta_metadata(metadata, source=source)
        trainer_meta = metadata.get("trainer")
        if not isinstance(trainer_meta, dict):
            raise CheckpointError(
                f"{source} holds a delta but no trainer state; use PreparedModel.load_delta"
            )
        if (trainer_meta.get("optimizer") or {}).get("kind") != self.config.kind:
            raise CheckpointMismatchError(
                f"{source} was trained with optimizer {trainer_meta.get('optimizer')}, this trainer uses "
                f"{self.config.to_dict()}; create the Trainer with the same optimizer kind"
            )
        # Trainer files written before the shared codec named the slots "optimizer/<name>/<slot>": read them.
        tensors = {
            OPTIMIZER_PREFIX + k[len(_LEGACY_PREFIX) :] if k.startswith(_LEGACY_PREFIX) else k: v
            for k, v in tensors.items()
        }
        delta = {k: v for k, v in tensors.items() if not k.startswith(OPTIMIZER_PREFIX)}
        by_name = decode_optimizer_state(
            tensors,
            trainer_meta.get("optimizer_scalars") or {},
            shapes={name: tuple(p.shape) for name, p in self._params.items()},
            source=source,
        )
        state = {
            self._params[name]: {
                k: v.to(self._params[name].device) if isinstance(v, Tensor) else v for k, v in by_slot.items()
            }
            for name, by_slot in by_name.items()
        }
        counters = trainer_meta.get("state") or {}
        try:
            restored = TrainerState(
                batches=int(counters.get("batches", 0)),
                samples=int(counters.get("samples", 0)),
                optimizer_steps=int(counters.get("optimizer_steps", 0)),
                skipped_batches=int(counters.get("skipped_batches", 0)),
                skipped_reasons={str(k): int(v) for k, v in (counters.get("skipped_reasons") or {}).items()},
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{source} has malformed trainer counters ({exc})") from None
        # Everything is checked; load_trainable validates the delta completely before copying.
        self.model.load_trainable(delta)
        self.optimizer.state.clear()
        for param, slots in state.items():
            self.optimizer.state[param] = slots
        self.state = restored
        self._pending = 0
        self._zero_grad()

    # -- internals -----------------------------------------------------------------------------------
    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _skip(self, reason: str, x: Tensor) -> StepResult:
        if self.on_nonfinite == "raise":
            raise NonFiniteBatchError(
                f"batch of {int(x.shape[0])} samples skipped: {reason.replace('_', ' ')}; clean the data or "
                f"create the Trainer with on_nonfinite='skip'"
            )
        self.state.skipped_batches += 1
        self.state.skipped_reasons[reason] = self.state.skipped_reasons.get(reason, 0) + 1
        logger.warning("skipped a batch of %d samples: %s", int(x.shape[0]), reason)
        return StepResult(loss=None, skipped=True, reason=reason, optimizer_stepped=False)

    @staticmethod
    def _check_labels(x: Tensor, y: Tensor) -> None:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise InputDtypeError(
                f"a batch is a pair of tensors (x, y), got ({type(x).__name__}, {type(y).__name__})"
            )
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise InputDtypeError(
                f"labels must be an integer tensor (torch.long), got {y.dtype}; use y.long()"
            )
        if y.ndim != 1 or x.ndim < 1 or y.shape[0] != x.shape[0]:
            raise InputShapeError(
                f"labels must be 1-D with one label per sample: x has shape {tuple(x.shape)}, y has shape "
                f"{tuple(y.shape)}"
            )

    @staticmethod
    def _check_label_range(y: Tensor, logits: Tensor) -> None:
        classes = int(logits.shape[-1])
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise InputShapeError(
                f"labels must be in 0..{classes - 1} (the model has {classes} outputs), got labels "
                f"{int(y.min())}..{int(y.max())}; grow or replace the head, or remap the labels"
            )

    def _progress_bar(self, description: str, total: int | None) -> Any:
        if not self.progress:
            return nullcontext(lambda result: None)
        return _RichBar(description, total)


class _RichBar:
    """A rich progress bar over batches showing the running loss."""

    def __init__(self, description: str, total: int | None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            transient=True,
        )
        self._task = self._progress.add_task(description, total=total, loss="-")

    def __enter__(self) -> Callable[[StepResult], None]:
        self._progress.start()

        def advance(result: StepResult) -> None:
            loss = "-" if result.loss is None else f"{result.loss:.3f}"
            self._progress.update(self._task, advance=1, loss=loss)

        return advance

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Any, *, batch_size: int = 256, loss_fn: LossFn | None = None
) -> EvalResult:
    """Accuracy and mean loss of ``model`` on ``data`` in eval mode; restores the model's mode after."""
    loss_fn = loss_fn or F.cross_entropy
    was_training = model.training
    model.eval()
    correct = 0
    total = 0
    loss_sum = 0.0
    try:
        for x, y in as_stream(data, batch_size=batch_size, shuffle=False):
            logits = logits_of(model(_as_model_dtype(x, model)))
            Trainer._check_label_range(y, logits)
            loss_sum += float(loss_fn(_loss_precision(logits), y)) * int(y.shape[0])
            correct += int((logits.argmax(dim=-1) == y).sum())
            total += int(y.shape[0])
    finally:
        model.train(was_training)
    if total == 0:
        raise ConfigError("cannot evaluate on empty data")
    return EvalResult(accuracy=correct / total, loss=loss_sum / total, samples=total)


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of ``model``'s parameters (None without floating parameters)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


_HALF = (torch.float16, torch.bfloat16)
_WIDTH = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}


def _as_model_dtype(x: Tensor, model: nn.Module) -> Tensor:
    """The batch in the model's floating dtype where that is expected or lossless.

    Streams deliver float32, so a bf16/fp16 model gets its float32 batches cast to its dtype (what
    ``model.to(dtype)`` did to the weights); a narrower float batch for a wider model is widened, which is
    lossless. Anything else (float64 into float32, fp16 <-> bf16, integers) passes through unchanged for
    the model's input check to reject with advice.
    """
    dtype = _model_dtype(model)
    if dtype is None or not isinstance(x, Tensor) or x.dtype == dtype:
        return x
    expected = x.dtype == torch.float32 and dtype in _HALF
    widening = x.dtype in _WIDTH and dtype in _WIDTH and _WIDTH[x.dtype] < _WIDTH[dtype]
    return x.to(dtype) if expected or widening else x


def logits_of(output: Any) -> Tensor:
    """The class scores in a model's output: a tensor, a ``.logits`` tensor (a transformers
    ``ModelOutput``), or the first tensor of a tuple.

    Raises:
        ConfigError: none of these; the message names the output's type.
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ConfigError(
        f"the model returned a {type(output).__name__}; the trainer needs class scores: a tensor, an "
        f"output with a .logits tensor (transformers) or a tuple starting with one. Wrap the model so it "
        f"returns them"
    )


def _loss_precision(logits: Tensor) -> Tensor:
    """Half-precision logits widened to float32 for the loss (log-softmax in bf16 loses too much)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits
