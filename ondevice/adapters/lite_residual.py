"""TinyTL lite residual branches (Cai et al., "TinyTL: Reduce Memory, Not Parameters for Efficient
On-Device Learning", NeurIPS 2020, Sec. 3.2 and Fig. 3)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from ondevice.errors import ConfigError

__all__ = ["LiteResidualBlock", "build_lite_residual_branch"]


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def build_lite_residual_branch(
    in_channels: int,
    out_channels: int,
    *,
    dims: int,
    stride: int,
    expand: float,
    kernel_size: int,
    groups: int,
    norm: str,
) -> nn.Sequential:
    """group conv (no bias) -> norm -> ReLU -> 1x1 conv (no bias) -> norm with zero scale.

    The branch width is ``expand * in_channels`` rounded up to a multiple of ``groups``; ``groups`` is
    reduced to the largest divisor of ``in_channels`` that does not exceed it.
    """
    if dims not in (1, 2):
        raise ConfigError(f"lite residual branches support 1-D and 2-D blocks, got {dims}-D")
    groups = max(g for g in range(1, groups + 1) if in_channels % g == 0)
    mid = max(groups, -(-round(in_channels * expand) // groups) * groups)
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    batch_norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d

    def make_norm(channels: int) -> nn.GroupNorm | nn.BatchNorm1d | nn.BatchNorm2d:
        return _group_norm(channels) if norm == "group" else batch_norm(channels)

    final_norm = make_norm(out_channels)
    nn.init.zeros_(final_norm.weight)
    return nn.Sequential(
        conv(
            in_channels, mid, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False
        ),
        make_norm(mid),
        nn.ReLU(),
        conv(mid, out_channels, 1, bias=False),
        final_norm,
    )


class LiteResidualBlock(nn.Module):
    """``base(x) + upsample(branch(avgpool(x)))`` around a convolutional block.

    Attributes:
        base: the wrapped block (frozen but for its biases, when the scheme trains them).
        pool: the branch's input downsampling (``nn.Identity`` when the factor is 1).
        branch: see :func:`build_lite_residual_branch`; its last norm's scale starts at zero.
    """

    def __init__(self, base: nn.Module, branch: nn.Sequential, *, dims: int, downsample: int) -> None:
        super().__init__()
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
