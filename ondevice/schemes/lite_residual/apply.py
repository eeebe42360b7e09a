"""Where lite residual branches go and how they are attached: blocks found by structure, widths fitted to
``LiteResidual.max_param_share``, channels and strides from one traced forward."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from ondevice._trace import CallShapes, trace_shapes
from ondevice.errors import ConfigError
from ondevice.models.blocks import block_types
from ondevice.schemes._tree import COMPUTE_TYPES, leaves, replace_submodule
from ondevice.schemes.base import ApplyContext, Scheme, register_applier, train_all_biases, train_head
from ondevice.schemes.lite_residual.config import LiteResidual
from ondevice.schemes.lite_residual.layers import (
    LiteResidualBlock,
    LiteResidualPlan,
    branch_param_count,
    branch_width,
    build_lite_residual_branch,
)

__all__ = ["plan_lite_residual", "residual_blocks"]

logger = logging.getLogger(__name__)

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
        train_all_biases(model)
    train_head(model, ctx, scheme)
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
