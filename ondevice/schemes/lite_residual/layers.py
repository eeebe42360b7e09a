"""TinyTL lite residual branches (Cai et al., "TinyTL: Reduce Memory, Not Parameters for Efficient
On-Device Learning", NeurIPS 2020, Sec. 3.2 and Fig. 3).

A branch sees the block's input at reduced resolution (``avgpool``), runs a group convolution with the
block's stride, a norm, a ReLU and a 1x1 projection to the block's output channels, and a last norm whose
scale starts at zero; its output is resized to the block's output and added. Everything a branch needs
(channels, stride, 1-D or 2-D) comes from the shapes the block was traced with, never from attributes of
the wrapped block. The arithmetic of branch widths and parameter counts lives here as pure functions, so
the width budget (``LiteResidual.max_param_share``) is computed before anything is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from ondevice.errors import ConfigError

__all__ = [
    "LiteResidualBlock",
    "LiteResidualPlan",
    "branch_groups",
    "branch_param_count",
    "branch_width",
    "build_lite_residual_branch",
    "lite_residual_plan",
]


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def branch_groups(in_channels: int, width: int, *, groups: int) -> int:
    """Groups of a branch's group convolution: ``groups`` reduced to the largest divisor of
    ``in_channels`` that does not exceed it, then to what ``width`` allows (their common divisor)."""
    largest = max(g for g in range(1, min(groups, in_channels) + 1) if in_channels % g == 0)
    return math.gcd(largest, width)


def branch_width(in_channels: int, *, expand: float, groups: int, cap: int | None = None) -> int:
    """Hidden channels of a branch: ``expand * in_channels`` rounded up to a multiple of the groups.

    With ``g`` the groups reduced to a divisor of ``in_channels`` (see :func:`branch_groups`), the width
    is at least ``g``. Given ``cap`` (what a parameter budget may need once every width is at ``g``), it
    is instead the largest divisor of ``g`` up to ``cap``: the group convolution then has as many groups
    as channels, each summing ``in_channels / width`` inputs, so its parameter count stays that of the
    width-``g`` branch while the 1x1 projection shrinks with the width.
    """
    g = branch_groups(in_channels, in_channels, groups=groups)
    if cap is not None:
        return max(d for d in range(1, min(g, max(1, cap)) + 1) if g % d == 0)
    return max(g, -(-round(in_channels * expand) // g) * g)


def branch_param_count(
    in_channels: int, out_channels: int, *, width: int, dims: int, kernel_size: int, groups: int
) -> int:
    """Parameters of one branch: group conv + norm + 1x1 conv + norm (both norms have scale and shift)."""
    g = branch_groups(in_channels, width, groups=groups)
    group_conv = width * (in_channels // g) * kernel_size**dims
    return group_conv + 2 * width + width * out_channels + 2 * out_channels


def build_lite_residual_branch(
    in_channels: int,
    out_channels: int,
    *,
    dims: int,
    stride: int,
    width: int,
    kernel_size: int,
    groups: int,
    norm: str,
) -> nn.Sequential:
    """group conv (no bias) -> norm -> ReLU -> 1x1 conv (no bias) -> norm with zero scale.

    ``groups`` is reduced by :func:`branch_groups`; any positive ``width`` works, :func:`branch_width`
    picks one on the group grid.
    """
    if dims not in (1, 2):
        raise ConfigError(f"lite residual branches support 1-D and 2-D blocks, got {dims}-D")
    if width < 1:
        raise ConfigError(f"a lite residual branch width must be a positive int, got {width}")
    g = branch_groups(in_channels, width, groups=groups)
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    batch_norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d

    def make_norm(channels: int) -> nn.GroupNorm | nn.BatchNorm1d | nn.BatchNorm2d:
        return _group_norm(channels) if norm == "group" else batch_norm(channels)

    final_norm = make_norm(out_channels)
    nn.init.zeros_(final_norm.weight)
    return nn.Sequential(
        conv(in_channels, width, kernel_size, stride=stride, padding=kernel_size // 2, groups=g, bias=False),
        make_norm(width),
        nn.ReLU(),
        conv(width, out_channels, 1, bias=False),
        final_norm,
    )


class LiteResidualBlock(nn.Module):
    """``base(x) + resize(branch(avgpool(x)))`` around a block that maps one tensor to one tensor.

    The branch output is resized to the block's output (linear / bilinear), whatever the block's stride
    and the pooling did to odd sizes. Nothing is read from ``base``: it is only called.

    Attributes:
        base: the wrapped block (frozen but for its biases, when the scheme trains them).
        pool: the branch's input downsampling (``nn.Identity`` when the factor is 1).
        branch: see :func:`build_lite_residual_branch`; its last norm's scale starts at zero.
    """

    def __init__(self, base: nn.Module, branch: nn.Sequential, *, dims: int, downsample: int) -> None:
        super().__init__()
        if dims not in (1, 2):
            raise ConfigError(f"lite residual branches support 1-D and 2-D blocks, got {dims}-D")
        self.base = base
        self.dims = dims
        if downsample > 1:
            pool = nn.AvgPool1d if dims == 1 else nn.AvgPool2d
            self.pool: nn.Module = pool(downsample, downsample, ceil_mode=True)
        else:
            self.pool = nn.Identity()
        self.branch = branch

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        residual = self.branch(self.pool(x))
        if residual.shape[2:] != out.shape[2:]:
            mode = "linear" if self.dims == 1 else "bilinear"
            residual = F.interpolate(residual, size=out.shape[2:], mode=mode, align_corners=False)
        return out + residual


@dataclass(frozen=True)
class LiteResidualPlan:
    """Where lite residual branches go and what they cost.

    Attributes:
        targets: qualified names of the wrapped blocks, in model order.
        widths: hidden channels of each branch (same order).
        branch_params: parameters of all branches together.
        model_params: parameters of the model without the branches.
        expand: the width factor actually used, relative to each block's input channels: the scheme's
            ``expand``, or less when the branches had to shrink to fit ``max_param_share``; 0 when even
            widths equal to the groups did not fit and the widths went below them (see
            :func:`branch_width`). None when read back from a prepared model, which does not record it.
    """

    targets: tuple[str, ...]
    widths: tuple[int, ...]
    branch_params: int
    model_params: int
    expand: float | None = None

    @property
    def share(self) -> float:
        """``branch_params / model_params``: what the branches add, relative to the model's own size."""
        return self.branch_params / max(1, self.model_params)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, ``share`` included."""
        return {
            "targets": list(self.targets),
            "widths": list(self.widths),
            "branch_params": self.branch_params,
            "model_params": self.model_params,
            "expand": self.expand,
            "share": self.share,
        }


def lite_residual_plan(model: nn.Module) -> LiteResidualPlan | None:
    """The plan a model was prepared with, read back from its :class:`LiteResidualBlock`\\ s (None if none).

    ``model`` is the prepared network (``PreparedModel.model``, whose names the targets then match).
    """
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, LiteResidualBlock)]
    if not blocks:
        return None
    branch_params = sum(p.numel() for _, block in blocks for p in block.branch.parameters())
    widths = []
    for _, block in blocks:
        first = block.branch[0]
        widths.append(int(first.out_channels) if isinstance(first, nn.Conv1d | nn.Conv2d) else 0)
    total = sum(p.numel() for p in model.parameters())
    return LiteResidualPlan(
        targets=tuple(name for name, _ in blocks),
        widths=tuple(widths),
        branch_params=branch_params,
        model_params=total - branch_params,
    )
