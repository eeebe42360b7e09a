"""How each update scheme is applied to a (copied) model: freeze, select, wrap.

One function per scheme type, found through a registry keyed by the scheme's class. Each receives a model
whose parameters are all frozen and returns nothing; it sets ``requires_grad`` on what trains and replaces
children through their parents where a branch or adapter is attached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from ondevice.adapters import (
    LiteResidualBlock,
    LoRALinear,
    PartialChannelUpdate,
    build_lite_residual_branch,
    select_input_channels,
)
from ondevice.errors import ConfigError, UnknownNameError
from ondevice.schemes import Bias, Full, LastLayer, LiteResidual, LoRA, Scheme, Sparse

COMPUTE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class ApplyContext:
    """What a scheme applicator may need besides the model: the head's qualified name (or None)."""

    head: str | None


Applier = Callable[[nn.Module, Scheme, ApplyContext], None]
_APPLIERS: dict[type[Scheme], Applier] = {}


def register_applier(scheme_type: type[Scheme]) -> Callable[[Applier], Applier]:
    """Register how a scheme type is applied (one applicator per scheme class)."""

    def decorate(fn: Applier) -> Applier:
        if scheme_type in _APPLIERS:
            raise ConfigError(f"an applicator for {scheme_type.__name__} is already registered")
        _APPLIERS[scheme_type] = fn
        return fn

    return decorate


def apply_scheme(model: nn.Module, scheme: Scheme, ctx: ApplyContext) -> None:
    """Apply ``scheme`` to ``model`` in place (all parameters must already be frozen)."""
    applier = _APPLIERS.get(type(scheme))
    if applier is None:
        raise UnknownNameError("scheme applicator", type(scheme).__name__, [t.__name__ for t in _APPLIERS])
    applier(model, scheme, ctx)


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


def _train(module: nn.Module, *, recurse: bool = True) -> None:
    for param in module.parameters(recurse=recurse):
        param.requires_grad_(True)


def _train_head(model: nn.Module, ctx: ApplyContext, scheme: Scheme) -> None:
    if ctx.head is None:
        raise ConfigError(
            f"scheme {scheme.name!r} trains the classifier head, but no head was found: the model has no "
            f"'classifier' attribute and no Linear layer. Pass head='qualified.name' to prepare()"
        )
    _train(model.get_submodule(ctx.head))


def _train_all_biases(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if name.rpartition(".")[2] == "bias":
            param.requires_grad_(True)


@register_applier(Full)
def _apply_full(model: nn.Module, scheme: Scheme, ctx: ApplyContext) -> None:
    _train(model)


@register_applier(LastLayer)
def _apply_last_layer(model: nn.Module, scheme: Scheme, ctx: ApplyContext) -> None:
    _train_head(model, ctx, scheme)


@register_applier(Bias)
def _apply_bias(model: nn.Module, scheme: Scheme, ctx: ApplyContext) -> None:
    _train_all_biases(model)
    _train_head(model, ctx, scheme)


def _is_registered_block(module: nn.Module) -> bool:
    try:
        from ondevice.models.blocks import block_types
    except ImportError:  # pragma: no cover - the zoo is part of the package
        return False
    return isinstance(module, block_types())


def _block_geometry(name: str, module: nn.Module) -> tuple[int, int, int, int]:
    """(in_channels, out_channels, stride, dims) of a module a lite residual branch wraps."""
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return (
            module.in_channels,
            module.out_channels,
            int(module.stride[0]),
            1 if isinstance(module, nn.Conv1d) else 2,
        )
    convs = [m for _, m in leaves(module) if isinstance(m, nn.Conv1d | nn.Conv2d)]
    if not convs:
        raise ConfigError(
            f"lite residual target {name!r} ({type(module).__name__}) contains no Conv1d/Conv2d; targets "
            f"must be convolutional blocks"
        )
    dims = 1 if isinstance(convs[0], nn.Conv1d) else 2
    if all(hasattr(module, a) for a in ("in_channels", "out_channels", "stride")):
        block: Any = module  # a block that states its own shape
        block_stride = block.stride
        total_stride = int(block_stride[0] if isinstance(block_stride, tuple) else block_stride)
        return int(block.in_channels), int(block.out_channels), total_stride, dims
    total_stride = 1
    for conv in convs:
        total_stride *= int(conv.stride[0])
    return convs[0].in_channels, convs[-1].out_channels, total_stride, dims


def lite_residual_targets(model: nn.Module, scheme: LiteResidual, head: str | None) -> list[str]:
    """Qualified names of the modules a lite residual scheme wraps (see ``LiteResidual.targets``)."""
    if scheme.targets:
        names = {name for name, _ in model.named_modules()}
        missing = [t for t in scheme.targets if t not in names]
        if missing:
            raise ConfigError(f"LiteResidual.targets {missing} are not modules of the model")
        return list(scheme.targets)
    blocks: list[str] = []
    for name, module in model.named_modules():
        if _is_registered_block(module) and not any(name.startswith(b + ".") for b in blocks):
            blocks.append(name)
    if blocks:
        return blocks
    return [
        name
        for name, module in leaves(model)
        if isinstance(module, nn.Conv1d | nn.Conv2d) and max(module.kernel_size) > 1 and name != head
    ]


@register_applier(LiteResidual)
def _apply_lite_residual(model: nn.Module, scheme: Scheme, ctx: ApplyContext) -> None:
    assert isinstance(scheme, LiteResidual)
    targets = lite_residual_targets(model, scheme, ctx.head)
    if not targets:
        raise ConfigError(
            "the lite residual scheme found no convolutional block to attach branches to; name them with "
            "LiteResidual(targets=(...)) or use the 'bias' or 'lora' scheme for this model"
        )
    if scheme.train_bias:
        _train_all_biases(model)
    _train_head(model, ctx, scheme)
    for name in targets:
        block = model.get_submodule(name)
        in_ch, out_ch, stride, dims = _block_geometry(name, block)
        reference = next(block.parameters(), None)
        branch = build_lite_residual_branch(
            in_ch,
            out_ch,
            dims=dims,
            stride=stride,
            expand=scheme.expand,
            kernel_size=scheme.kernel_size,
            groups=scheme.groups,
            norm=scheme.norm,
        )
        if reference is not None:
            branch.to(device=reference.device, dtype=reference.dtype)
        replace_submodule(
            model, name, LiteResidualBlock(block, branch, dims=dims, downsample=scheme.downsample)
        )


def compute_layers(model: nn.Module, head: str | None) -> list[tuple[str, nn.Module]]:
    """The Conv1d/Conv2d/Linear leaves in registration order, the head excluded (Sparse's layer list)."""
    return [(n, m) for n, m in leaves(model) if isinstance(m, COMPUTE_TYPES) and n != head]


def layer_bias(model: nn.Module, name: str) -> nn.Parameter | None:
    """A layer's bias, or the shift of the norm leaf right after it when it has none (BN folding)."""
    layer = model.get_submodule(name)
    own_bias = getattr(layer, "bias", None)
    if isinstance(own_bias, nn.Parameter):
        return own_bias
    ordered = list(leaves(model))
    index = next(i for i, (n, _) in enumerate(ordered) if n == name)
    if index + 1 < len(ordered):
        follower = ordered[index + 1][1]
        shift = getattr(follower, "bias", None)
        if isinstance(follower, NORM_TYPES) and isinstance(shift, nn.Parameter):
            return shift
    return None


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
        _train_head(model, ctx, scheme)
    chosen = [_resolve_layer(layers, ref) for ref in scheme.weight_layers]
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"Sparse.weight_layers names a layer twice: {chosen}")
    for name, ratio in zip(chosen, scheme.ratios(), strict=True):
        layer = model.get_submodule(name)
        assert isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Linear)  # _resolve_layer returns these only
        if ratio >= 1.0:
            layer.weight.requires_grad_(True)
            continue
        index = select_input_channels(layer, ratio)
        replace_submodule(model, name, PartialChannelUpdate(layer, index))


@register_applier(LoRA)
def _apply_lora(model: nn.Module, scheme: Scheme, ctx: ApplyContext) -> None:
    assert isinstance(scheme, LoRA)
    if scheme.targets:
        targets = list(scheme.targets)
        for name in targets:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ConfigError(
                    f"LoRA.targets names {name!r}, which is not a module of the model"
                ) from None
            if not isinstance(module, nn.Linear):
                raise ConfigError(
                    f"LoRA.targets {name!r} is a {type(module).__name__}; LoRA adapts nn.Linear"
                )
    else:
        targets = [n for n, m in leaves(model) if isinstance(m, nn.Linear) and n != ctx.head]
    if not targets:
        raise ConfigError(
            "the LoRA scheme found no Linear layer to adapt besides the head; use 'bias' or 'lite_residual' "
            "for convolutional models, or name Linear layers in LoRA(targets=(...))"
        )
    if scheme.train_bias:
        _train_all_biases(model)
    if scheme.train_classifier:
        _train_head(model, ctx, scheme)
    for name in targets:
        target = model.get_submodule(name)
        assert isinstance(target, nn.Linear)  # lora targets are Linear layers
        replace_submodule(model, name, LoRALinear(target, rank=scheme.rank, alpha=scheme.alpha))
