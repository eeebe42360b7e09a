"""How LoRA is applied: which linear layers get adapters (never one an attention reads directly)."""

from __future__ import annotations

from torch import nn

from ondevice.errors import ConfigError
from ondevice.schemes._tree import leaves, linear_features, replace_submodule
from ondevice.schemes.base import ApplyContext, Scheme, register_applier, train_all_biases, train_head
from ondevice.schemes.lora.config import LoRA
from ondevice.schemes.lora.layers import LoRALinear

__all__: list[str] = []


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
            n for n, m in leaves(model) if linear_features(m) is not None and n != ctx.head and n not in skip
        ]
    if not targets:
        raise ConfigError(
            "the LoRA scheme found no linear layer (nn.Linear, transformers' Conv1D) to adapt besides the "
            "head; use 'bias' or 'lite_residual' for convolutional models, or name layers in "
            "LoRA(targets=(...))"
        )
    if scheme.train_bias:
        train_all_biases(model)
    if scheme.train_classifier:
        train_head(model, ctx, scheme)
    for name in targets:
        target = model.get_submodule(name)
        adapter = LoRALinear(
            target, rank=scheme.rank, alpha=scheme.alpha, freeze_a=scheme.freeze_a, name=name
        )
        replace_submodule(model, name, adapter)
