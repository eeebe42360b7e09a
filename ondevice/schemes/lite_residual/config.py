"""The lite residual scheme's configuration (TinyTL, Cai et al., NeurIPS 2020, Sec. 3.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ondevice.errors import ConfigError
from ondevice.schemes.base import Scheme, check_bool, check_names, register_scheme


@register_scheme
@dataclass(frozen=True)
class LiteResidual(Scheme):
    """TinyTL lite residual learning (Cai et al., NeurIPS 2020, Sec. 3.2).

    Around each residual block ``y = block(x)`` a side branch is added::

        y = block(x) + upsample(norm2(conv1x1(act(norm1(groupconv(avgpool(x)))))))

    where ``avgpool`` downsamples by ``downsample`` (2x2 in TinyTL), ``groupconv`` has ``groups`` groups,
    kernel ``kernel_size`` (5) and the block's stride, and the last norm's scale starts at zero, so the
    prepared model computes exactly what the original did. Channels and stride come from one traced
    forward (on fake tensors) of the example batch, never from attributes of the block.

    Blocks are found by structure, one branch per block as TinyTL places them (never per convolution,
    never nested, never the head): zoo models use their registered blocks (``ondevice.models.blocks``);
    other models use the innermost modules that sit in a ``Sequential``/``ModuleList`` (or beside a
    sibling of their own type) and hold at least two Conv/Linear layers, one of them a convolution with a
    kernel larger than 1 (torchvision/timm ``InvertedResidual``, ``BasicBlock``, ``MBConv``, transformers
    ``MobileNetV2InvertedResidual``, ``ResNetBasicLayer``, ``EfficientNetBlock``, ``ConvNextLayer``, ...).
    A plain stack of convolutions without such blocks gets one branch per convolution with a kernel
    larger than 1. Only blocks that take one tensor and return one of the same rank (3-D or 4-D) are
    wrapped.

    The defaults are narrower than TinyTL's (``expand=1``, 2 groups), which on MobileNetV2 would add more
    parameters than the model has: here the branches add 5 % of MobileNetV2's parameters, 3 % of
    ResNet-18's, 4 % of EfficientNet-B0's, 2 % of MobileNetV3-Small's and 8 % of ConvNeXt's (timm,
    torchvision and transformers alike). ``ondevice.adapters.lite_residual_plan(prepared.model)`` states
    the targets, widths and share of a prepared model.

    Attributes:
        expand: width of each branch relative to its block's input channels (rounded up to a multiple of
            the groups and at least the groups).
        kernel_size: kernel of the group convolution.
        groups: groups of that convolution (reduced to the largest divisor of the block's input channels
            that does not exceed it).
        downsample: pooling factor applied to the branch input (1 disables it).
        norm: ``"group"`` (GroupNorm, as TinyTL uses on device) or ``"batch"``.
        train_bias: whether the backbone's biases train too (TinyTL trains "lite residual + bias").
        targets: qualified names of the modules to wrap (each must take and return one 3-D or 4-D
            tensor). Empty: the blocks found by structure, as above.
        max_param_share: the most parameters all branches together may add, as a fraction of the model's
            own. Branches that would add more at ``expand`` shrink together: a smaller width factor down
            to widths equal to the groups, then through the groups' divisors down to one channel; if even
            one-channel branches exceed it, prepare raises a ConfigError saying what share they need.
    """

    name: ClassVar[str] = "lite_residual"
    expand: float = 0.25
    kernel_size: int = 5
    groups: int = 16
    downsample: int = 2
    norm: Literal["group", "batch"] = "group"
    train_bias: bool = True
    targets: tuple[str, ...] = ()
    max_param_share: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.expand, int | float) or isinstance(self.expand, bool) or not self.expand > 0:
            raise ConfigError(f"LiteResidual.expand must be a positive number, got {self.expand!r}")
        for attr in ("kernel_size", "groups", "downsample"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"LiteResidual.{attr} must be a positive int, got {value!r}")
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"LiteResidual.kernel_size must be odd (same padding), got {self.kernel_size}")
        if self.norm not in ("group", "batch"):
            raise ConfigError(f"LiteResidual.norm must be 'group' or 'batch', got {self.norm!r}")
        check_bool(self, "train_bias")
        check_names(self, "targets")
        share = self.max_param_share
        if not isinstance(share, int | float) or isinstance(share, bool) or not 0 < share <= 1:
            raise ConfigError(
                f"LiteResidual.max_param_share must be a number in (0, 1] (a fraction of the model's "
                f"parameters), got {share!r}"
            )
