"""Frozen weights held in int8: a backbone that trains in about a quarter of its float32 weight memory.

``prepare(model, scheme, frozen_weights="int8")`` stores every frozen weight of a Conv1d/Conv2d/Linear/
Embedding layer (and transformers' ``Conv1D``) as int8 with one float32 scale per output channel
(symmetric, ``w ~ q * scale`` with ``q`` in [-127, 127]), as QLoRA does for large models and TinyTL and
tiny-training assume for microcontrollers. Nothing float of it is kept:

* **forward**: the layer's ``weight`` becomes a property (its class gains the :class:`Int8Weight` mixin)
  that dequantises the int8 tensor when the layer runs; the float copy lives for that layer's call only.
* **backward**: an op that needs the weight for the input gradient saves it for backward; the saved-tensor
  hooks of :func:`int8_saved_weights` (installed by ``PreparedModel.forward``) store the int8 tensor and
  its scale instead and dequantise again when backward reads it.

So the gradients are those of a float model whose weights are the dequantised int8 values (the test
compares them), and what a step holds is the int8 weights, their scales and one layer's float weight at a
time. Biases, norms, lite-residual branches, LoRA adapters, the head and every weight that trains stay
float32. Layers whose weight another module reads directly (the frozen base of a partial-channel update,
``nn.MultiheadAttention``'s projections) stay float as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ondevice.errors import ConfigError
from ondevice.schemes._tree import linear_features
from ondevice.schemes.sparse import PartialChannelUpdate

__all__ = [
    "FROZEN_WEIGHT_FORMATS",
    "Int8Weight",
    "dequantized",
    "int8_saved_weights",
    "is_int8",
    "quantizable_frozen",
    "quantize_frozen_weights",
    "quantized_layers",
]

FROZEN_WEIGHT_FORMATS = ("float", "int8")
"""What ``prepare(frozen_weights=...)`` accepts: ``"float"`` (as the model has them) or ``"int8"``."""

_TAG = "_ondevice_int8_source"  # set on a dequantised weight: the (int8, scale, channel axis) it came from


def _channel_axis(module: nn.Module) -> int:
    """The weight axis of the output channels: 1 for GPT-2's ``Conv1D`` (weight in x out), else 0."""
    is_linear_like = linear_features(module) is not None and not isinstance(module, nn.Linear)
    return 1 if is_linear_like else 0


def _scale_shape(weight: Tensor, axis: int) -> list[int]:
    shape = [1] * weight.dim()
    shape[axis] = weight.shape[axis]
    return shape


def dequantized(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``q * scale`` in ``dtype`` (``scale`` broadcasts along the output channels)."""
    return q.to(dtype) * scale.to(dtype)


_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _int8_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` with a ``weight`` property that dequantises ``weight_int8`` (one subclass per class)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Int8{cls.__name__}", (cls, Int8Weight), {"__module__": cls.__module__})
    return _CLASSES[cls]


class Int8Weight:
    """Mixin of a layer whose weight is held in int8: ``weight`` is computed from ``weight_int8`` (int8,
    frozen) and ``weight_scale`` (float32, one per output channel, shaped to broadcast), both parameters
    that never train, so memory reports count them as the layer's frozen weights."""

    weight_int8: nn.Parameter
    weight_scale: nn.Parameter
    _int8_dtype: torch.dtype

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        value = dequantized(self.weight_int8, self.weight_scale, self._int8_dtype)
        setattr(value, _TAG, (self.weight_int8, self.weight_scale, self._int8_dtype))
        return value


def _quantize(module: nn.Module, axis: int) -> None:
    weight = module._parameters.pop("weight")
    assert weight is not None
    with torch.no_grad():
        w = weight.detach().float()
        reduce = [d for d in range(w.dim()) if d != axis]
        peak = w.abs().amax(dim=reduce, keepdim=True)
        scale = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
        q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    module.__class__ = _int8_class(type(module))
    module.register_parameter("weight_int8", nn.Parameter(q, requires_grad=False))
    module.register_parameter("weight_scale", nn.Parameter(scale.contiguous(), requires_grad=False))
    module._int8_dtype = weight.dtype  # type: ignore[assignment]


def is_int8(module: nn.Module) -> bool:
    """Whether ``module``'s weight is held in int8 by :func:`quantize_frozen_weights`."""
    return isinstance(module, Int8Weight)


def quantized_layers(model: nn.Module) -> list[str]:
    """Qualified names of the layers of ``model`` whose weight is held in int8."""
    return [name for name, module in model.named_modules() if is_int8(module)]


def _read_directly(model: nn.Module) -> set[int]:
    """Modules whose weight a parent reads instead of calling them: they must keep a float weight."""
    held: set[int] = set()
    for module in model.modules():
        if isinstance(module, PartialChannelUpdate | nn.MultiheadAttention):
            held.update(id(child) for child in module.modules() if child is not module)
    return held


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    held = _read_directly(model)
    for name, module in model.named_modules():
        weight = getattr(module, "_parameters", {}).get("weight")
        if weight is None or id(module) in held or is_int8(module):
            continue
        layer = isinstance(module, nn.Conv1d | nn.Conv2d | nn.Embedding)
        if (layer or linear_features(module) is not None) and weight.is_floating_point():
            yield name, module


def quantizable_frozen(model: nn.Module) -> list[str]:
    """Names of the layers of ``model`` whose frozen weight :func:`quantize_frozen_weights` would hold in
    int8 (empty when every such weight trains)."""
    return [name for name, module in _candidates(model) if not module.get_parameter("weight").requires_grad]


def quantize_frozen_weights(model: nn.Module) -> list[str]:
    """Hold every frozen Conv/Linear/Embedding weight of ``model`` in int8, in place; returns their names.

    A weight that trains stays float. Raises ``ConfigError`` when no weight is frozen (every weight
    trains, as under the ``full`` scheme): int8 storage is for frozen weights only.
    """
    done: list[str] = []
    trained: list[str] = []
    for name, module in list(_candidates(model)):
        weight = module._parameters["weight"]
        assert weight is not None
        if weight.requires_grad:
            trained.append(name)
            continue
        if not weight.is_floating_point():
            continue
        _quantize(module, _channel_axis(module))
        done.append(name)
    if not done:
        raise ConfigError(
            f"frozen_weights='int8' stores frozen weights in int8, but every weight of this model trains "
            f"({len(trained)} layers); int8 weights cannot train. Use a scheme that freezes the backbone: "
            f"'bias', 'last_layer', 'lite_residual', 'lora' or 'sparse' (its trained layers stay float)"
        )
    return done


def _outer_hooks() -> tuple[Callable[[Tensor], Any], Callable[[Any], Tensor]] | None:
    """The saved-tensor hooks active around this forward (``memory.measure`` counts with such hooks)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return None if top is None else top(False)


@contextmanager
def int8_saved_weights() -> Iterator[None]:
    """Within it, a dequantised int8 weight saved for backward is kept as its int8 tensor and scale.

    Other saved tensors go to the hooks that were active before (if any), so ``memory.measure`` and
    ``memory.estimate`` still see everything a step keeps; the int8 weights are parameters, counted as
    such, and the float copies are not kept.
    """
    outer = _outer_hooks()

    def pack(tensor: Tensor) -> Any:
        source = getattr(tensor, _TAG, None)
        if source is not None:
            return (_TAG, source)
        base = tensor._base
        source = None if base is None else getattr(base, _TAG, None)
        if source is not None:  # a view of one, as F.linear saves weight.t(): rebuilt on unpack
            return ("view", (source, tuple(tensor.shape), tensor.stride(), tensor.storage_offset()))
        return tensor if outer is None else ("outer", outer[0](tensor))

    def unpack(packed: Any) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        kind, value = packed
        if kind == _TAG:
            q, scale, dtype = value
            return dequantized(q, scale, dtype)
        if kind == "view":
            (q, scale, dtype), shape, stride, offset = value
            return dequantized(q, scale, dtype).as_strided(shape, stride, offset)
        assert outer is not None
        return outer[1](value)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
