"""Full fine-tuning, the baseline every other scheme is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ondevice.schemes.base import ApplyContext, Scheme, register_applier, register_scheme, train

__all__ = ["Full"]


@register_scheme
@dataclass(frozen=True)
class Full(Scheme):
    """Full fine-tuning: every parameter trains and norm statistics update (the baseline)."""

    name: ClassVar[str] = "full"
    update_norm_stats: bool = True


@register_applier(Full)
def _apply_full(model: nn.Module, scheme: Scheme, ctx: ApplyContext) -> None:
    train(model)
