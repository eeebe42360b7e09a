"""Low-rank adapters (LoRA, and LoRA-FA with a frozen down-projection): configuration, the adapter
module, and which layers get one."""

from ondevice.schemes.lora import apply as _apply  # noqa: F401  (registers the applicator)
from ondevice.schemes.lora.config import LoRA
from ondevice.schemes.lora.layers import LoRALinear, frozen_a_seed

__all__ = ["LoRA", "LoRALinear", "frozen_a_seed"]
