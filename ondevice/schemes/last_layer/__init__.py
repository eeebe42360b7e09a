"""Train the classifier head alone: a linear probe on frozen features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ondevice.schemes.base import ApplyContext, Scheme, register_applier, register_scheme, train_head

__all__ = ["LastLayer"]


@register_scheme
@dataclass(frozen=True)
class LastLayer(Scheme):
    """Only the classifier head trains (a linear probe on frozen features)."""

    name: ClassVar[str] = "last_layer"


@register_applier(LastLayer)
def _apply_last_layer(model: nn.Module, scheme: Scheme, ctx: ApplyContext) -> None:
    train_head(model, ctx, scheme)
