"""Modules that prepare() wraps around a model's children: lite residual branches, LoRA, partial channels."""

from ondevice.adapters.lite_residual import (
    LiteResidualBlock,
    LiteResidualPlan,
    branch_param_count,
    branch_width,
    build_lite_residual_branch,
    lite_residual_plan,
)
from ondevice.adapters.lora import LoRALinear, linear_features
from ondevice.adapters.partial import PartialChannelUpdate, select_input_channels

__all__ = [
    "LiteResidualBlock",
    "LiteResidualPlan",
    "LoRALinear",
    "PartialChannelUpdate",
    "branch_param_count",
    "branch_width",
    "build_lite_residual_branch",
    "linear_features",
    "lite_residual_plan",
    "select_input_channels",
]
