"""Module-tree helpers the schemes share: which leaves compute, where a layer's bias is, swapping a child."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

__all__ = [
    "BATCH_NORM_TYPES",
    "COMPUTE_TYPES",
    "NORM_TYPES",
    "compute_layers",
    "layer_bias",
    "leaves",
    "linear_features",
    "replace_submodule",
]

COMPUTE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)

_CONV1D = "transformers.pytorch_utils.Conv1D"
"""GPT-2's projection: ``x @ weight + bias`` with ``weight`` stored as (in_features, out_features)."""


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a layer that applies a linear map to the last dim, else None.

    ``nn.Linear`` (and subclasses, e.g. timm's), and transformers' ``Conv1D`` (GPT-2), recognised by its
    qualified name so that ondevice never imports transformers.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if any(f"{cls.__module__}.{cls.__qualname__}" == _CONV1D for cls in type(module).__mro__):
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() == 2:
            return int(weight.shape[0]), int(weight.shape[1])
    return None


def leaves(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules without children, with qualified names, in registration order."""
    for name, module in model.named_modules():
        if next(module.children(), None) is None:
            yield name, module


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the child ``name`` (qualified) through its parent."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def compute_layers(model: nn.Module, head: str | None) -> list[tuple[str, nn.Module]]:
    """The Conv1d/Conv2d/Linear leaves (and other linear layers, e.g. transformers' Conv1D) in registration
    order, the head excluded (Sparse's layer list)."""
    return [
        (n, m)
        for n, m in leaves(model)
        if (isinstance(m, COMPUTE_TYPES) or linear_features(m) is not None) and n != head
    ]


def layer_bias(model: nn.Module, name: str) -> nn.Parameter | None:
    """A layer's bias, or the shift of the norm right after it when it has none (BN folding).

    "Right after" is the next module in registration order outside the layer, so a norm with children of
    its own (timm's ``BatchNormAct2d`` holds its activation) counts as well as a leaf one.
    """
    layer = model.get_submodule(name)
    own_bias = getattr(layer, "bias", None)
    if isinstance(own_bias, nn.Parameter):
        return own_bias
    ordered = list(model.named_modules())
    index = next(i for i, (n, _) in enumerate(ordered) if n == name)
    follower = next((m for n, m in ordered[index + 1 :] if not n.startswith(name + ".")), None)
    shift = getattr(follower, "bias", None)
    if isinstance(follower, NORM_TYPES) and isinstance(shift, nn.Parameter):
        return shift
    return None
