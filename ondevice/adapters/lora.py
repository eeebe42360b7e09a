"""LoRA adapters for Linear layers (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2022)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from ondevice.errors import ConfigError

__all__ = ["LoRALinear"]


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * lora_B(lora_A(x))`` around a frozen ``nn.Linear``.

    ``lora_A`` and ``lora_B`` are plain bias-free ``nn.Linear`` layers, so the memory-saving ops for Linear
    cover them: ``lora_A`` keeps the layer input (its weight trains), ``lora_B`` keeps the rank-r hidden.
    ``lora_B`` starts at zero (Sec. 4.1 of the paper), so the wrapped layer first computes exactly ``base``.
    """

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"LoRA adapts nn.Linear layers, got {type(base).__name__}")
        if rank > min(base.in_features, base.out_features):
            raise ConfigError(
                f"LoRA rank {rank} exceeds min(in_features={base.in_features}, "
                f"out_features={base.out_features})"
                f"; choose rank <= {min(base.in_features, base.out_features)}"
            )
        self.base = base
        self.rank = rank
        self.scaling = float(alpha) / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"
