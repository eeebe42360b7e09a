"""Modules that prepare() wraps around a model's children: lite residual branches, LoRA, partial channels."""

from ondevice.adapters.lite_residual import LiteResidualBlock, build_lite_residual_branch
from ondevice.adapters.lora import LoRALinear
from ondevice.adapters.partial import PartialChannelUpdate, select_input_channels

__all__ = [
    "LiteResidualBlock",
    "LoRALinear",
    "PartialChannelUpdate",
    "build_lite_residual_branch",
    "select_input_channels",
]
