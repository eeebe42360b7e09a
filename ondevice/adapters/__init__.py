"""The modules prepare() attaches to a model, gathered from the scheme folders that own them.

Each lives with its scheme (``ondevice.schemes.lite_residual``, ``.lora``, ``.sparse``); this package is
the public face that names them together.
"""

from ondevice.schemes._tree import linear_features
from ondevice.schemes.lite_residual import (
    LiteResidualBlock,
    LiteResidualPlan,
    branch_param_count,
    branch_width,
    build_lite_residual_branch,
    lite_residual_plan,
)
from ondevice.schemes.lora import LoRALinear
from ondevice.schemes.sparse import PartialChannelUpdate, select_input_channels

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
