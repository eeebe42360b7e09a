"""TinyTL's lite residual learning: configuration, branch modules, and how branches are placed."""

from ondevice.schemes.lite_residual import apply as _apply  # noqa: F401  (registers the applicator)
from ondevice.schemes.lite_residual.apply import plan_lite_residual, residual_blocks
from ondevice.schemes.lite_residual.config import LiteResidual
from ondevice.schemes.lite_residual.layers import (
    LiteResidualBlock,
    LiteResidualPlan,
    branch_param_count,
    branch_width,
    build_lite_residual_branch,
    lite_residual_plan,
)

__all__ = [
    "LiteResidual",
    "LiteResidualBlock",
    "LiteResidualPlan",
    "branch_param_count",
    "branch_width",
    "build_lite_residual_branch",
    "lite_residual_plan",
    "plan_lite_residual",
    "residual_blocks",
]
