"""LoRA adapters for Linear layers (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2022)."""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor, nn

from ondevice.errors import ConfigError
from ondevice.schemes._tree import linear_features

__all__ = ["LoRALinear", "frozen_a_seed", "linear_features"]


def frozen_a_seed(name: str) -> int:
    """The seed of a frozen ``lora_A`` for the layer named ``name``: its CRC-32 (stable across runs)."""
    return zlib.crc32(name.encode())


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * lora_B(lora_A(x))`` around a frozen linear layer.

    ``base`` is an ``nn.Linear`` or another layer :func:`linear_features` recognises (GPT-2's ``Conv1D``).

    ``lora_A`` and ``lora_B`` are plain bias-free ``nn.Linear`` layers, so the memory-saving ops for Linear
    cover them: ``lora_A`` keeps the layer input (its weight trains), ``lora_B`` keeps the rank-r hidden.
    ``lora_B`` starts at zero (Sec. 4.1 of the paper), so the wrapped layer first computes exactly ``base``.

    With ``freeze_a`` (LoRA-FA, Zhang et al. 2023) ``lora_A``'s weight does not train: the frozen ``lora_A``
    keeps nothing, and only ``lora_B`` keeps its rank-r input. ``name`` (the layer's qualified name) then
    seeds the generator ``lora_A`` is drawn from (:func:`frozen_a_seed`), so the frozen weight is the same
    wherever the model is prepared again.
    """

    def __init__(
        self, base: nn.Module, *, rank: int, alpha: float, freeze_a: bool = False, name: str = ""
    ) -> None:
        super().__init__()
        features = linear_features(base)
        if features is None:
            raise ConfigError(
                f"LoRA adapts linear layers (nn.Linear, transformers' Conv1D), got {type(base).__name__}"
            )
        in_features, out_features = features
        if rank > min(in_features, out_features):
            raise ConfigError(
                f"LoRA rank {rank} exceeds min(in_features={in_features}, out_features={out_features}); "
                f"choose rank <= {min(in_features, out_features)}"
            )
        self.base = base
        self.rank = rank
        self.scaling = float(alpha) / rank
        weight = next(base.parameters())
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Linear(in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, out_features, bias=False, **factory)
        generator = None
        if freeze_a:
            generator = torch.Generator(device=weight.device).manual_seed(frozen_a_seed(name))
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.weight.requires_grad_(not freeze_a)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling

    def extra_repr(self) -> str:
        frozen = ", freeze_a=True" if not self.lora_A.weight.requires_grad else ""
        return f"rank={self.rank}, scaling={self.scaling:g}{frozen}"
