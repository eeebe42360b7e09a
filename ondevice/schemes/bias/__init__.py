"""Bias-only fine-tuning (TinyTL, Cai et al., NeurIPS 2020, Sec. 3): every bias and norm shift, the head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ondevice.schemes.base import (
    ApplyContext,
    Scheme,
    register_applier,
    register_scheme,
    train_all_biases,
    train_head,
)

__all__ = ["Bias"]


@register_scheme
@dataclass(frozen=True)
class Bias(Scheme):
    """Every parameter named ``bias`` (convolution, linear and norm shifts) plus the head (TinyTL, Sec. 3)."""

    name: ClassVar[str] = "bias"


@register_applier(Bias)
def _apply_bias(model: nn.Module, scheme: Scheme, ctx: ApplyContext) -> None:
    train_all_biases(model)
    train_head(model, ctx, scheme)
