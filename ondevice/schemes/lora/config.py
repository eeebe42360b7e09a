"""The LoRA scheme's configuration (Hu et al., ICLR 2022; LoRA-FA, Zhang et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ondevice.errors import ConfigError
from ondevice.schemes.base import Scheme, check_bool, check_names, register_scheme


@register_scheme
@dataclass(frozen=True)
class LoRA(Scheme):
    """Low-rank adapters on Linear layers (Hu et al., ICLR 2022): ``W x + (alpha / rank) B A x``.

    ``A`` (rank x in) is Kaiming-uniform initialised and ``B`` (out x rank) zero, so the prepared model
    first computes exactly what the original did.

    Attributes:
        rank: rank of the adapters.
        alpha: scale numerator; the update is multiplied by ``alpha / rank``.
        targets: qualified names of the Linear layers to adapt; empty means every Linear except the head.
        train_bias: whether the backbone's biases train too.
        train_classifier: whether the head trains.
        freeze_a: LoRA-FA (Zhang et al., "LoRA-FA: Memory-efficient Low-rank Adaptation", 2023): ``A``
            stays at its random initialisation and only ``B`` trains, so an adapter keeps only its rank-r
            hidden for backward instead of the layer's whole input. A frozen ``A`` is drawn from a
            generator seeded by the layer's qualified name, so every device and every re-prepared model
            gets the same ``A`` (checkpoints and federated updates carry only ``B``).
    """

    name: ClassVar[str] = "lora"
    rank: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = field(default=())
    train_bias: bool = False
    train_classifier: bool = True
    freeze_a: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA.rank must be a positive int, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or self.alpha <= 0:
            raise ConfigError(f"LoRA.alpha must be a positive number, got {self.alpha!r}")
        check_names(self, "targets")
        check_bool(self, "train_bias")
        check_bool(self, "train_classifier")
        check_bool(self, "freeze_a")
