"""The sparse update scheme's configuration (tiny-training, Lin et al., NeurIPS 2022, Sec. 3.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ondevice.errors import ConfigError
from ondevice.schemes.base import Scheme, check_bool, register_scheme


@register_scheme
@dataclass(frozen=True)
class Sparse(Scheme):
    """tiny-training's sparse update (Lin et al., NeurIPS 2022, Sec. 3.2).

    Layers are the model's Conv1d/Conv2d/Linear leaves in registration order, the head excluded.

    Attributes:
        bias_last_k: the biases of the last k layers train (None: the last half, rounded up). A
            convolution without a bias uses the shift of the norm layer that directly follows it (its bias
            once BN is folded, as on the MCU).
        weight_layers: layers whose weights train, by index into the layer list (negative counts from
            the end) or by qualified name. Default: the last layer.
        channel_ratios: per weight layer, the fraction of input channels whose weights train (the
            largest-norm ones); empty means 1.0 for all. A ratio below 1 needs a dense layer (groups=1).
            Default: all channels.
        train_classifier: whether the head trains.
    """

    name: ClassVar[str] = "sparse"
    bias_last_k: int | None = None
    weight_layers: tuple[int | str, ...] = (-1,)
    channel_ratios: tuple[float, ...] = ()
    train_classifier: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        k = self.bias_last_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ConfigError(f"Sparse.bias_last_k must be None or an int >= 0, got {k!r}")
        if not isinstance(self.weight_layers, tuple) or not all(
            isinstance(v, str | int) and not isinstance(v, bool) for v in self.weight_layers
        ):
            raise ConfigError(
                f"Sparse.weight_layers must be a tuple of ints or names, got {self.weight_layers!r}"
            )
        if not isinstance(self.channel_ratios, tuple):
            raise ConfigError(f"Sparse.channel_ratios must be a tuple of floats, got {self.channel_ratios!r}")
        if self.channel_ratios and len(self.channel_ratios) != len(self.weight_layers):
            raise ConfigError(
                f"Sparse.channel_ratios has {len(self.channel_ratios)} entries but weight_layers has "
                f"{len(self.weight_layers)}; give one ratio per weight layer, or none for all 1.0"
            )
        for ratio in self.channel_ratios:
            if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
                raise ConfigError(f"Sparse.channel_ratios entries must be in (0, 1], got {ratio!r}")
        check_bool(self, "train_classifier")

    def bias_layers(self, num_layers: int) -> int:
        """How many of the last layers train their biases, for a model with ``num_layers`` layers."""
        return -(-num_layers // 2) if self.bias_last_k is None else self.bias_last_k

    def ratios(self) -> tuple[float, ...]:
        """The channel ratio of each weight layer (1.0 where none was given)."""
        return tuple(float(r) for r in self.channel_ratios) or (1.0,) * len(self.weight_layers)
