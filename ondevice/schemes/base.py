"""Update schemes: which tensors of a pretrained model train on the device.

A scheme is data: a frozen, JSON-serialisable, versioned dataclass. ``ondevice.prepare(model, scheme)``
turns it into a prepared model; ``resolve_scheme`` accepts a scheme, its name or its ``to_dict()`` form.

| name            | what trains                                                                        |
|-----------------|------------------------------------------------------------------------------------|
| ``full``        | every parameter (norm statistics update too)                                       |
| ``last_layer``  | the classifier head                                                                |
| ``bias``        | every parameter named ``bias`` (norm shifts included) + the head (TinyTL)          |
| ``lite_residual`` | TinyTL lite residual branches + (optionally) biases + the head                  |
| ``sparse``      | biases of the last k layers, weights of chosen layers, optionally on a fraction of |
|                 | their input channels (tiny-training's sparse update)                               |
| ``lora``        | low-rank adapters on Linear layers (+ the head)                                    |
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ondevice._jsonable import fields_to_dict
from ondevice.errors import ConfigError, UnknownSchemeError

__all__ = [
    "SCHEME_VERSION",
    "Bias",
    "Full",
    "LastLayer",
    "LiteResidual",
    "LoRA",
    "Scheme",
    "Sparse",
    "list_schemes",
    "register_scheme",
    "resolve_scheme",
]

SCHEME_VERSION = 1
"""Bumped when a scheme's fields or meaning change; checkpoints record it."""

_REGISTRY: dict[str, type[Scheme]] = {}


def register_scheme(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator adding a scheme type to the registry under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"scheme class {cls.__name__} needs a non-empty class attribute 'name'")
    if name in _REGISTRY:
        raise ConfigError(f"a scheme named {name!r} is already registered ({_REGISTRY[name].__name__})")
    _REGISTRY[name] = cls
    return cls


def list_schemes() -> list[str]:
    """Names of the registered schemes, sorted."""
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class Scheme:
    """Base class of update schemes.

    Attributes:
        update_norm_stats: whether the running statistics of the model's BatchNorm layers keep updating
            while training. Off for every scheme but ``full``: a device sees small, skewed batches, and
            TinyTL / tiny-training keep the pretrained statistics.
    """

    name: ClassVar[str] = ""
    update_norm_stats: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.update_norm_stats, bool):
            raise ConfigError(
                f"{type(self).__name__}.update_norm_stats must be a bool, got {self.update_norm_stats!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"name": ..., "version": ..., **fields}`` (tuples become lists)."""
        return {"name": self.name, "version": SCHEME_VERSION, **fields_to_dict(self)}

    def to_json(self) -> str:
        """``to_dict`` as a compact, key-sorted JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_dict(payload: Mapping[str, Any]) -> Scheme:
        """Rebuild a scheme from ``to_dict()`` output, validating name, version and fields."""
        if not isinstance(payload, Mapping) or "name" not in payload:
            raise ConfigError(f"a scheme dict needs a 'name' key, got {payload!r}")
        data = dict(payload)
        name = data.pop("name")
        version = data.pop("version", SCHEME_VERSION)
        if version != SCHEME_VERSION:
            raise ConfigError(
                f"scheme {name!r} was written with scheme version {version}, this ondevice reads version "
                f"{SCHEME_VERSION}; re-create the scheme with this version"
            )
        cls = _lookup(name)
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"scheme {name!r} has no field(s) {unknown}; its fields are {sorted(known)}")
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)

    @staticmethod
    def from_json(text: str) -> Scheme:
        """Inverse of :meth:`to_json`."""
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"scheme JSON does not parse: {exc}") from None
        return Scheme.from_dict(payload)


def _lookup(name: object) -> type[Scheme]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownSchemeError(name, _REGISTRY)
    return _REGISTRY[name]


def resolve_scheme(scheme: Scheme | str | Mapping[str, Any]) -> Scheme:
    """Turn a scheme, a scheme name (``"bias"``) or a scheme dict into a scheme object."""
    if isinstance(scheme, Scheme):
        if type(scheme) is Scheme:
            raise ConfigError("Scheme is an abstract base; use one of " + ", ".join(list_schemes()))
        return scheme
    if isinstance(scheme, str):
        return _lookup(scheme)()
    if isinstance(scheme, Mapping):
        return Scheme.from_dict(scheme)
    raise ConfigError(
        f"a scheme must be a Scheme, a name or a dict, got {type(scheme).__name__}; "
        f"valid names are {', '.join(list_schemes())}"
    )


def _check_bool(owner: object, name: str) -> None:
    if not isinstance(getattr(owner, name), bool):
        raise ConfigError(f"{type(owner).__name__}.{name} must be a bool, got {getattr(owner, name)!r}")


def _check_names(owner: object, name: str) -> None:
    value = getattr(owner, name)
    if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(
            f"{type(owner).__name__}.{name} must be a tuple of qualified module names, got {value!r}"
        )


@register_scheme
@dataclass(frozen=True)
class Full(Scheme):
    """Full fine-tuning: every parameter trains and norm statistics update (the baseline)."""

    name: ClassVar[str] = "full"
    update_norm_stats: bool = True


@register_scheme
@dataclass(frozen=True)
class LastLayer(Scheme):
    """Only the classifier head trains (a linear probe on frozen features)."""

    name: ClassVar[str] = "last_layer"


@register_scheme
@dataclass(frozen=True)
class Bias(Scheme):
    """Every parameter named ``bias`` (convolution, linear and norm shifts) plus the head (TinyTL, Sec. 3)."""

    name: ClassVar[str] = "bias"


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
        _check_bool(self, "train_bias")
        _check_names(self, "targets")
        share = self.max_param_share
        if not isinstance(share, int | float) or isinstance(share, bool) or not 0 < share <= 1:
            raise ConfigError(
                f"LiteResidual.max_param_share must be a number in (0, 1] (a fraction of the model's "
                f"parameters), got {share!r}"
            )


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
        _check_bool(self, "train_classifier")

    def bias_layers(self, num_layers: int) -> int:
        """How many of the last layers train their biases, for a model with ``num_layers`` layers."""
        return -(-num_layers // 2) if self.bias_last_k is None else self.bias_last_k

    def ratios(self) -> tuple[float, ...]:
        """The channel ratio of each weight layer (1.0 where none was given)."""
        return tuple(float(r) for r in self.channel_ratios) or (1.0,) * len(self.weight_layers)


@register_scheme
@dataclass(frozen=True)
class LoRA(Scheme):
    """Low-rank adapters on Linear layers (Hu et al., ICLR 2022): ``W x + (alpha / rank) B A x``.

    ``A`` (rank x in) is Kaiming-uniform initialised and ``B`` (out x rank) zero, so the prepared model
    first computes exactly what the original did.

    Attributes:
        rank: rank of the adapters.
        alpha: scale numerator; the update is multiplied by ``alpha / rank``.
        targets: qualified names of the Linear layers to adapt; empty means every Linear except the head.
        train_bias: whether the backbone's biases train too.
        train_classifier: whether the head trains.
        freeze_a: LoRA-FA (Zhang et al., "LoRA-FA: Memory-efficient Low-rank Adaptation", 2023): ``A``
            stays at its random initialisation and only ``B`` trains, so an adapter keeps only its rank-r
            hidden for backward instead of the layer's whole input. A frozen ``A`` is drawn from a
            generator seeded by the layer's qualified name, so every device and every re-prepared model
            gets the same ``A`` (checkpoints and federated updates carry only ``B``).
    """

    name: ClassVar[str] = "lora"
    rank: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = field(default=())
    train_bias: bool = False
    train_classifier: bool = True
    freeze_a: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA.rank must be a positive int, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or self.alpha <= 0:
            raise ConfigError(f"LoRA.alpha must be a positive number, got {self.alpha!r}")
        _check_names(self, "targets")
        _check_bool(self, "train_bias")
        _check_bool(self, "train_classifier")
        _check_bool(self, "freeze_a")
