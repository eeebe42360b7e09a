"""``LearnerConfig``: how a :class:`~ondevice.continual.learner.Learner` trains (checkpoints carry it)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ondevice.errors import ConfigError, UnknownNameError

__all__ = ["RECIPES", "LearnerConfig", "Recipe", "positive_int"]

Recipe = Literal["er", "once"]
RECIPES: tuple[str, ...] = ("er", "once")


def positive_int(owner: str, name: str, value: object) -> None:
    """Raise :class:`ConfigError` naming ``owner.name`` unless ``value`` is an int >= 1 (bools refused)."""
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
            positive_int("LearnerConfig", name, getattr(self, name))
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
