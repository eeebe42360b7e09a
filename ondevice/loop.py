"""The one training loop: an optimizer step, and epochs of seeded shuffled mini-batches.

Everything in ondevice that trains steps through here: :class:`~ondevice.Trainer`,
:class:`~ondevice.continual.Learner`, pretraining (:mod:`ondevice.pretrain`) and the planner's short
fine-tuning runs (:mod:`memory.contribution`).

- :func:`optimizer_step` is the step: backward, a finite-gradient check that leaves the weights and the
  optimizer state untouched when it fails, an optional hook between backward and step (a regulariser's
  gradient correction), the step itself, and clearing the gradients.
- :func:`shuffled_batches` is the order: one permutation per epoch from the caller's generator, cut into
  mini-batches, too-small batches (BatchNorm needs two samples) dropped.
- :func:`train_epochs` runs both over in-memory tensors with AdamW and a one-cycle schedule
  (Smith & Topin 2019), the recipe pretraining uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ondevice.errors import ConfigError

__all__ = ["EpochRecipe", "gradients_finite", "optimizer_step", "shuffled_batches", "train_epochs"]


def gradients_finite(params: Iterable[Tensor]) -> bool:
    """True when no gradient of ``params`` holds NaN or Inf (a missing gradient counts as finite)."""
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def optimizer_step(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    check: Iterable[Tensor] | None = None,
    divide_by: int = 1,
    step: bool = True,
    before_step: Callable[[], None] | None = None,
) -> bool:
    """Backward ``loss / divide_by`` and, when ``step``, step ``optimizer`` and clear the gradients.

    Args:
        loss: the scalar loss of the batch.
        optimizer: the optimizer over the trained parameters.
        check: parameters whose gradients must be finite; when one is not, all gradients are cleared,
            nothing steps and the result is False (None: no check).
        divide_by: divide the loss before backward (gradient accumulation over this many batches).
        step: step now; False leaves the gradients to accumulate for a later call.
        before_step: called after the check, before the step (e.g. a regulariser's gradient correction).

    Returns:
        False when the gradient check failed (nothing changed but the cleared gradients), else True.
    """
    (loss / divide_by).backward()
    if check is not None and not gradients_finite(check):
        optimizer.zero_grad(set_to_none=True)
        return False
    if step:
        if before_step is not None:
            before_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return True


def shuffled_batches(
    size: int, batch_size: int, generator: torch.Generator, *, min_batch: int = 2
) -> Iterator[Tensor]:
    """Indices of one epoch: a permutation of ``range(size)`` drawn from ``generator``, cut into batches of
    ``batch_size``; a last batch smaller than ``min_batch`` is dropped."""
    order = torch.randperm(size, generator=generator)
    for start in range(0, size, batch_size):
        idx = order[start : start + batch_size]
        if idx.numel() >= min_batch:
            yield idx


def batches_per_epoch(size: int, batch_size: int, *, min_batch: int = 2) -> int:
    """How many batches :func:`shuffled_batches` yields per epoch."""
    return sum(1 for start in range(0, size, batch_size) if min(batch_size, size - start) >= min_batch)


@dataclass(frozen=True)
class EpochRecipe:
    """How :func:`train_epochs` trains: AdamW at a one-cycle schedule over cross-entropy.

    Attributes:
        epochs: passes over the data.
        lr: the schedule's peak learning rate.
        batch_size: samples per step.
        weight_decay: AdamW's decoupled weight decay.
        label_smoothing: cross-entropy label smoothing.
        warmup: fraction of the steps the learning rate rises (OneCycleLR's ``pct_start``).
    """

    epochs: int
    lr: float
    batch_size: int = 32
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    warmup: float = 0.3

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"epochs must be a positive int, got {self.epochs!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ConfigError(
                f"batch_size must be an int >= 2 (BatchNorm needs two samples), got {self.batch_size!r}"
            )
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if not 0 < self.warmup < 1:
            raise ConfigError(f"warmup must be a fraction in (0, 1), got {self.warmup!r}")


def train_epochs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    recipe: EpochRecipe,
    *,
    generator: torch.Generator,
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    after_epoch: Callable[[], None] | None = None,
) -> None:
    """Train every parameter of ``model`` on ``(x, y)`` as ``recipe`` says; the model is left in train mode.

    Args:
        model: the model (all its parameters train).
        x, y: inputs and integer labels.
        recipe: optimizer, schedule and loss settings.
        generator: draws each epoch's order (and is passed to ``augment``).
        augment: called on each batch's inputs before the forward pass.
        after_epoch: called after each epoch (a progress bar's advance).
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * batches_per_epoch(len(x), recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=max(1, steps), pct_start=recipe.warmup
    )
    model.train()
    for _ in range(recipe.epochs):
        for idx in shuffled_batches(len(x), recipe.batch_size, generator):
            inputs = x[idx] if augment is None else augment(x[idx], generator)
            loss = F.cross_entropy(model(inputs), y[idx], label_smoothing=recipe.label_smoothing)
            optimizer_step(loss, optimizer)
            schedule.step()
        if after_epoch is not None:
            after_epoch()
