"""Partial-channel weight updates (tiny-training's sparse update, Lin et al. 2022, Sec. 3.2).

A layer whose weight trains on only a fraction of its input channels keeps its frozen weight and holds the
trainable columns as a separate parameter. Only those columns travel in checkpoints and federated updates,
and the memory-saving op for this module keeps only those input channels for backward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ondevice.errors import ConfigError

__all__ = ["PartialChannelUpdate", "select_input_channels"]

_Layer = nn.Conv1d | nn.Conv2d | nn.Linear


def select_input_channels(layer: _Layer, ratio: float) -> Tensor:
    """Indices (sorted) of the ``ceil(ratio * in_channels)`` input channels with the largest weight norm.

    tiny-training updates the input channels whose weights have the largest L2 norm (a cheap proxy for
    their contribution, Lin et al. 2022, Sec. 3.2).
    """
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"a channel ratio must be in (0, 1], got {ratio!r}")
    weight = layer.weight.detach()
    in_channels = weight.shape[1]
    count = max(1, int(torch.ceil(torch.tensor(ratio * in_channels)).item()))
    norms = weight.transpose(0, 1).reshape(in_channels, -1).norm(dim=1)
    chosen = torch.topk(norms, count, largest=True, sorted=False).indices
    return torch.sort(chosen).values


class PartialChannelUpdate(nn.Module):
    """Wraps a frozen Conv1d/Conv2d/Linear; trains ``weight[:, channel_index]`` only.

    Attributes:
        base: the original layer, frozen (its ``weight`` is never written; its bias may train).
        weight_update: trainable copy of ``base.weight[:, channel_index]``.
        channel_index: sorted indices of the trained input channels (a buffer).

    The effective weight is ``base.weight`` with columns ``channel_index`` replaced by ``weight_update``, so
    the wrapped layer computes exactly what ``base`` did until ``weight_update`` changes.
    """

    channel_index: Tensor

    def __init__(self, base: _Layer, channel_index: Tensor) -> None:
        super().__init__()
        if not isinstance(base, nn.Conv1d | nn.Conv2d | nn.Linear):
            raise ConfigError(
                "partial-channel updates apply to Conv1d, Conv2d and Linear layers, "
                f"got {type(base).__name__}"
            )
        if isinstance(base, nn.Conv1d | nn.Conv2d) and base.groups != 1:
            raise ConfigError(
                f"partial-channel updates need a dense convolution (groups=1), got groups={base.groups}; "
                "use a channel ratio of 1 for depthwise or grouped convolutions"
            )
        index = torch.as_tensor(channel_index, dtype=torch.long).flatten()
        in_channels = base.weight.shape[1]
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= in_channels:
            raise ConfigError(f"channel_index must select from 0..{in_channels - 1}, got {index.tolist()}")
        if index.unique().numel() != index.numel():
            raise ConfigError("channel_index must not repeat a channel")
        self.base = base
        self.base.weight.requires_grad_(False)
        self.register_buffer("channel_index", torch.sort(index).values)
        self.weight_update = nn.Parameter(base.weight.detach()[:, self.channel_index].clone())

    @property
    def in_channels(self) -> int:
        """Input channels (or features) of the wrapped layer."""
        return int(self.base.weight.shape[1])

    def effective_weight(self) -> Tensor:
        """The full weight: frozen columns from ``base``, trained columns from ``weight_update``."""
        return self.base.weight.index_copy(1, self.channel_index, self.weight_update)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.effective_weight()
        base = self.base
        if isinstance(base, nn.Linear):
            return F.linear(x, weight, base.bias)
        if base.padding_mode != "zeros":
            raise ConfigError(f"padding_mode {base.padding_mode!r} is not supported; use 'zeros'")
        conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
        return conv(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)

    def extra_repr(self) -> str:
        return f"channels={self.channel_index.numel()}/{self.in_channels}"
