"""How a sparse update is applied: biases of the last layers, chosen weights, partial input channels."""

from __future__ import annotations

from torch import nn

from ondevice.errors import ConfigError
from ondevice.schemes._tree import compute_layers, layer_bias, replace_submodule
from ondevice.schemes.base import ApplyContext, Scheme, register_applier, train_head
from ondevice.schemes.sparse.config import Sparse
from ondevice.schemes.sparse.layers import PartialChannelUpdate, select_input_channels

__all__: list[str] = []


def _resolve_layer(layers: list[tuple[str, nn.Module]], ref: int | str) -> str:
    names = [n for n, _ in layers]
    if isinstance(ref, int):
        if not -len(names) <= ref < len(names):
            raise ConfigError(
                f"Sparse.weight_layers index {ref} is out of range: the model has {len(names)} layers "
                f"(Conv/Linear leaves without the head), indices -{len(names)}..{len(names) - 1}"
            )
        return names[ref]
    if ref not in names:
        raise ConfigError(
            f"Sparse.weight_layers name {ref!r} is not a Conv/Linear layer of the model; layers are "
            f"{names[:6]}{' ...' if len(names) > 6 else ''}"
        )
    return ref


@register_applier(Sparse)
def _apply_sparse(model: nn.Module, scheme: Scheme, ctx: ApplyContext) -> None:
    assert isinstance(scheme, Sparse)
    layers = compute_layers(model, ctx.head)
    bias_k = scheme.bias_layers(len(layers))
    if bias_k > len(layers):
        raise ConfigError(
            f"Sparse.bias_last_k={bias_k} but the model has only {len(layers)} layers "
            f"(Conv/Linear leaves without the head)"
        )
    for name, _ in layers[len(layers) - bias_k :]:
        bias = layer_bias(model, name)
        if bias is not None:
            bias.requires_grad_(True)
    if scheme.train_classifier:
        train_head(model, ctx, scheme)
    chosen = [_resolve_layer(layers, ref) for ref in scheme.weight_layers]
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"Sparse.weight_layers names a layer twice: {chosen}")
    for name, ratio in zip(chosen, scheme.ratios(), strict=True):
        layer = model.get_submodule(name)
        weight = getattr(layer, "weight", None)
        assert isinstance(weight, nn.Parameter)  # _resolve_layer returns compute layers only
        if ratio >= 1.0:
            weight.requires_grad_(True)
            continue
        if not isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Linear):
            raise ConfigError(
                f"Sparse.channel_ratios gives {ratio} for {name!r}, a {type(layer).__name__}; partial "
                f"channel updates work on Conv1d, Conv2d and Linear layers. Use ratio 1.0 for this layer"
            )
        index = select_input_channels(layer, ratio)
        replace_submodule(model, name, PartialChannelUpdate(layer, index))
