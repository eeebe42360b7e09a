"""How each update scheme is applied to a (copied) model: freeze, select, wrap.

One function per scheme type, found through a registry keyed by the scheme's class. Each receives a model
whose parameters are all frozen and returns nothing; it sets ``requires_grad`` on what trains and replaces
children through their parents where a branch or adapter is attached.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

from ondevice._example import ExampleSpec
from ondevice._trace import CallShapes, trace_shapes
from ondevice.adapters import (
    LiteResidualBlock,
    LiteResidualPlan,
    LoRALinear,
    PartialChannelUpdate,
    branch_param_count,
    branch_width,
    build_lite_residual_branch,
    linear_features,
    select_input_channels,
)
from ondevice.errors import ConfigError, UnknownNameError
from ondevice.models.blocks import block_types
from ondevice.schemes import Bias, Full, LastLayer, LiteResidual, LoRA, Scheme, Sparse

COMPUTE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyContext:
    """What a scheme applicator may need besides the model.

    Attributes:
        head: the classifier head's qualified name, or None.
        example: the batch shape and dtype the model can be traced with (see ``ondevice._example``), or
            None when neither the user nor the model states one.
    """

    head: str | None
    example: ExampleSpec | None = None


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


# -- lite residual (TinyTL) ------------------------------------------------------------------------------
_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)
_FITTING_SCHEMES = "use the 'bias' scheme (any model) or 'lora' (models built from Linear layers)"


def _is_registered_block(module: nn.Module) -> bool:
    return isinstance(module, block_types())


def _is_spatial_conv(module: nn.Module) -> bool:
    return isinstance(module, _CONV_TYPES) and max(getattr(module, "kernel_size", (1,))) > 1


def _outermost(names: list[str]) -> list[str]:
    kept: list[str] = []
    for name in names:  # named_modules order: a parent comes before its children
        if not any(name.startswith(k + ".") for k in kept):
            kept.append(name)
    return kept


def residual_blocks(model: nn.Module, head: str | None) -> list[str]:
    """The blocks lite residual branches attach to, found by structure (see ``LiteResidual``).

    Zoo models: their registered blocks. Other models: the innermost modules that are an element of a
    ``Sequential``/``ModuleList`` (or have a sibling of their own type) and hold at least two Conv/Linear
    leaves, one a convolution with a kernel larger than 1, and not the head. Without such blocks: every
    convolution with a kernel larger than 1, when the model has at least two (a plain conv stack).
    """
    registered = [n for n, m in model.named_modules() if n and _is_registered_block(m)]
    if registered:
        return _outermost(registered)
    compute: dict[str, int] = {}
    spatial: dict[str, int] = {}
    for name, module in leaves(model):
        if not isinstance(module, COMPUTE_TYPES):
            continue
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            compute[prefix] = compute.get(prefix, 0) + 1
            spatial[prefix] = spatial.get(prefix, 0) + int(_is_spatial_conv(module))
    candidates: list[str] = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        repeated = isinstance(parent, nn.Sequential | nn.ModuleList)
        for child_name, child in children:
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if head is not None and (name == head or head.startswith(name + ".")):
                continue
            if compute.get(name, 0) < 2 or spatial.get(name, 0) < 1:
                continue
            if repeated or sum(type(c) is type(child) for _, c in children) > 1:
                candidates.append(name)
    innermost = [c for c in candidates if not any(o.startswith(c + ".") for o in candidates)]
    if innermost:
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        return sorted(innermost, key=order.__getitem__)
    convs = [n for n, m in leaves(model) if _is_spatial_conv(m) and n != head]
    return convs if len(convs) >= 2 else []


def _stride(size_in: int, size_out: int) -> int:
    """The smallest stride that takes ``size_in`` to at most ``size_out`` (padding rounds up: 7 -> 4 is 2)."""
    if size_out >= size_in:
        return 1
    return next(s for s in range(1, size_in + 1) if -(-size_in // s) <= size_out)


@dataclass(frozen=True)
class _Geometry:
    in_channels: int
    out_channels: int
    stride: int
    dims: int


def _geometry(shapes: CallShapes) -> _Geometry | str:
    """A block's branch geometry from its traced call, or why it cannot have a branch."""
    if shapes.calls != 1:
        return f"it ran {shapes.calls} times in one forward (a branch needs exactly one call)"
    if shapes.input_shape is None or shapes.output_shape is None:
        return "it does not take one tensor and return one tensor"
    rank_in, rank_out = len(shapes.input_shape), len(shapes.output_shape)
    if rank_in != rank_out or rank_in not in (3, 4):
        return (
            f"it maps a {rank_in}-D tensor to a {rank_out}-D one; branches need N x C x L or N x C x H x W "
            f"in and out"
        )
    size_in, size_out = shapes.input_shape[2:], shapes.output_shape[2:]
    strides = {_stride(a, b) for a, b in zip(size_in, size_out, strict=True)}
    return _Geometry(shapes.input_shape[1], shapes.output_shape[1], max(strides), rank_in - 2)


def _branch_params(geometries: list[_Geometry], scheme: LiteResidual, widths: list[int]) -> int:
    return sum(
        branch_param_count(
            g.in_channels,
            g.out_channels,
            width=width,
            dims=g.dims,
            kernel_size=scheme.kernel_size,
            groups=scheme.groups,
        )
        for g, width in zip(geometries, widths, strict=True)
    )


def _widths(
    geometries: list[_Geometry], scheme: LiteResidual, expand: float, cap: int | None = None
) -> list[int]:
    return [branch_width(g.in_channels, expand=expand, groups=scheme.groups, cap=cap) for g in geometries]


def _fit_widths(
    geometries: list[_Geometry], scheme: LiteResidual, budget: int
) -> tuple[float, list[int]] | None:
    """The widest branches that fit ``budget`` parameters, and their width factor (None: none fit).

    Widths only grow with the factor, so a bisection finds the largest factor up to ``scheme.expand``
    that fits. At the factor's low end every width equals its groups; below that, the widths step down
    through the groups' divisors together (factor 0, see ``branch_width``'s ``cap``) to one channel.
    """
    for expand in (scheme.expand, 0.0):
        widths = _widths(geometries, scheme, expand)
        if _branch_params(geometries, scheme, widths) <= budget:
            break
    else:
        for cap in range(scheme.groups - 1, 0, -1):
            widths = _widths(geometries, scheme, 0.0, cap)
            if _branch_params(geometries, scheme, widths) <= budget:
                return 0.0, widths
        return None
    if expand == scheme.expand:
        return expand, widths
    low, high = 0.0, float(scheme.expand)
    for _ in range(40):
        middle = (low + high) / 2
        if _branch_params(geometries, scheme, _widths(geometries, scheme, middle)) <= budget:
            low = middle
        else:
            high = middle
    return low, _widths(geometries, scheme, low)


def _explicit_targets(model: nn.Module, scheme: LiteResidual) -> list[str]:
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in scheme.targets if t not in set(names)]
    if missing:
        blocks = residual_blocks(model, None) or names
        raise ConfigError(
            f"LiteResidual.targets {missing} are not modules of the model; blocks it has include "
            f"{blocks[:4]}{' ...' if len(blocks) > 4 else ''}"
        )
    nested = [t for t in scheme.targets if any(t.startswith(o + ".") for o in scheme.targets)]
    if nested:
        raise ConfigError(f"LiteResidual.targets {nested} lie inside other targets; branches cannot nest")
    return list(scheme.targets)


def plan_lite_residual(model: nn.Module, scheme: LiteResidual, ctx: ApplyContext) -> LiteResidualPlan:
    """Where ``scheme``'s branches go on ``model``, how wide they are and what they add; changes nothing.

    Raises:
        ConfigError: the model has no convolutional blocks (the message names the schemes that fit), no
            example batch to trace it with, a bad target, or branches that cannot fit
            ``scheme.max_param_share``.
    """
    return _place(model, scheme, ctx)[0]


def _place(
    model: nn.Module, scheme: LiteResidual, ctx: ApplyContext
) -> tuple[LiteResidualPlan, list[_Geometry]]:
    if not any(isinstance(m, _CONV_TYPES) for _, m in leaves(model)):
        raise ConfigError(
            f"the lite residual scheme adds branches to convolutional blocks, but {type(model).__name__} has "
            f"no Conv1d/Conv2d layer; {_FITTING_SCHEMES}"
        )
    explicit = bool(scheme.targets)
    targets = _explicit_targets(model, scheme) if explicit else residual_blocks(model, ctx.head)
    if not targets:
        raise ConfigError(
            f"the lite residual scheme found no convolutional block in {type(model).__name__} (it needs "
            f"blocks of two or more layers with a spatial convolution, or at least two such convolutions); "
            f"name blocks with LiteResidual(targets=(...)) or {_FITTING_SCHEMES}"
        )
    if ctx.example is None:
        raise ConfigError(
            f"the lite residual scheme traces {type(model).__name__} once to size its branches, but no "
            f"example batch is known; pass prepare(..., example_input=(1, C, H, W))"
        )
    traced = trace_shapes(model, targets, ctx.example)
    placed: list[tuple[str, _Geometry]] = []
    for name in targets:
        geometry = _geometry(traced[name])
        if isinstance(geometry, str):
            if explicit:
                raise ConfigError(f"LiteResidual.targets {name!r} cannot have a branch: {geometry}")
            logger.debug("lite residual: no branch on %s: %s", name, geometry)
            continue
        placed.append((name, geometry))
    if not placed:
        raise ConfigError(
            f"none of the {len(targets)} blocks found in {type(model).__name__} maps one N x C x ... "
            f"tensor to one (e.g. {targets[0]!r}); name blocks with LiteResidual(targets=(...)) or "
            f"{_FITTING_SCHEMES}"
        )
    geometries = [g for _, g in placed]
    model_params = sum(p.numel() for p in model.parameters())
    budget = int(scheme.max_param_share * model_params)
    fitted = _fit_widths(geometries, scheme, budget)
    if fitted is None:
        narrowest = _branch_params(geometries, scheme, _widths(geometries, scheme, 0.0, cap=1))
        needed = narrowest / max(1, model_params)
        raise ConfigError(
            f"{len(placed)} lite residual branches need at least {needed:.1%} of the model's "
            f"{model_params:,} parameters even one channel wide, more than "
            f"max_param_share={scheme.max_param_share:g}; raise LiteResidual(max_param_share=...) to at "
            f"least {needed:.3f}, use a smaller kernel_size, or name fewer blocks in "
            f"LiteResidual(targets=(...))"
        )
    expand, widths = fitted
    if expand < scheme.expand:
        logger.info(
            "lite residual: branches at expand=%g would exceed %.0f%% of the model's parameters; using %.4g",
            scheme.expand,
            100 * scheme.max_param_share,
            expand,
        )
    plan = LiteResidualPlan(
        targets=tuple(name for name, _ in placed),
        widths=tuple(widths),
        branch_params=_branch_params(geometries, scheme, widths),
        model_params=model_params,
        expand=expand,
    )
    return plan, geometries


@register_applier(LiteResidual)
def _apply_lite_residual(model: nn.Module, scheme: Scheme, ctx: ApplyContext) -> None:
    assert isinstance(scheme, LiteResidual)
    plan, geometries = _place(model, scheme, ctx)
    if scheme.train_bias:
        _train_all_biases(model)
    _train_head(model, ctx, scheme)
    for name, width, geometry in zip(plan.targets, plan.widths, geometries, strict=True):
        block = model.get_submodule(name)
        reference = next(block.parameters(), None)
        branch = build_lite_residual_branch(
            geometry.in_channels,
            geometry.out_channels,
            dims=geometry.dims,
            stride=geometry.stride,
            width=width,
            kernel_size=scheme.kernel_size,
            groups=scheme.groups,
            norm=scheme.norm,
        )
        if reference is not None:
            branch.to(device=reference.device, dtype=reference.dtype)
        replace_submodule(
            model, name, LiteResidualBlock(block, branch, dims=geometry.dims, downsample=scheme.downsample)
        )


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


def _read_by_parent(model: nn.Module) -> set[str]:
    """Linear layers whose parent reads their weight instead of calling them (``MultiheadAttention``'s
    ``out_proj``): wrapping them would change nothing the parent computes, or break it."""
    return {
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_children()
    }


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
            if linear_features(module) is None:
                raise ConfigError(
                    f"LoRA.targets {name!r} is a {type(module).__name__}; LoRA adapts linear layers "
                    f"(nn.Linear, transformers' Conv1D)"
                )
            if name in _read_by_parent(model):
                raise ConfigError(
                    f"LoRA.targets {name!r} belongs to an nn.MultiheadAttention, which reads its weight "
                    f"directly instead of calling it; adapt the layers around the attention instead"
                )
    else:
        skip = _read_by_parent(model)
        targets = [
            n
            for n, m in leaves(model)
            if linear_features(m) is not None and n != ctx.head and n not in skip
        ]
    if not targets:
        raise ConfigError(
            "the LoRA scheme found no linear layer (nn.Linear, transformers' Conv1D) to adapt besides the "
            "head; use 'bias' or 'lite_residual' for convolutional models, or name layers in "
            "LoRA(targets=(...))"
        )
    if scheme.train_bias:
        _train_all_biases(model)
    if scheme.train_classifier:
        _train_head(model, ctx, scheme)
    for name in targets:
        target = model.get_submodule(name)
        adapter = LoRALinear(
            target, rank=scheme.rank, alpha=scheme.alpha, freeze_a=scheme.freeze_a, name=name
        )
        replace_submodule(model, name, adapter)
