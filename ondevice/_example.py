"""The shape of an example batch for a model: what prepare traces a model's shapes and bytes with.

A user may give one (``prepare(..., example_input=...)``: a tensor or a batch shape). Otherwise it is
read from what the model states about itself, in this order: the zoo's ``input_shape``; a transformers
``config`` (``num_channels`` x ``image_size`` for vision models, token ids for text models); a vision
transformer's own image size (torchvision ``image_size``, timm ``patch_embed.img_size``); a timm
``pretrained_cfg["input_size"]``; else the first layer (a convolution's input channels at 224 px, a
Linear layer's features, an Embedding's token ids). Only shapes and dtypes matter: prepare runs its
traces on fake tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ondevice.errors import ConfigError

__all__ = ["DEFAULT_IMAGE_SIZE", "DEFAULT_TOKENS", "ExampleSpec", "example_spec"]

DEFAULT_IMAGE_SIZE = 224
"""Side of the image a convolutional model is traced with when it states no input size."""
DEFAULT_TOKENS = 32
"""Sequence length a text model is traced with when it states none."""


@dataclass(frozen=True)
class ExampleSpec:
    """A batch shape and dtype, and where they came from (for reports and error messages)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str

    @property
    def is_token_ids(self) -> bool:
        return not self.dtype.is_floating_point

    def empty(self, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Tensor:
        """An uninitialised batch of this shape (token ids are zeros, always a valid index)."""
        if self.is_token_ids:
            return torch.zeros(self.shape, dtype=self.dtype, device=device)
        return torch.empty(self.shape, dtype=dtype or self.dtype, device=device)

    def describe(self) -> str:
        dims = " x ".join(str(s) for s in self.shape)
        kind = "token ids" if self.is_token_ids else "values"
        return f"{dims} {kind} ({self.source})"


def _ints(value: object) -> tuple[int, ...] | None:
    if (
        isinstance(value, Sequence)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return tuple(int(v) for v in value)
    return None


def _from_config(model: nn.Module, float_dtype: torch.dtype) -> ExampleSpec | None:
    config: Any = getattr(model, "config", None)
    if config is None:
        return None
    size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", None)
    if isinstance(channels, int) and channels > 0:
        side = size if isinstance(size, int) and size > 0 else DEFAULT_IMAGE_SIZE
        if isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(s, int) for s in size):
            return ExampleSpec((1, channels, int(size[0]), int(size[1])), float_dtype, "the model's config")
        return ExampleSpec((1, channels, side, side), float_dtype, "the model's config")
    if isinstance(getattr(config, "vocab_size", None), int):
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        tokens = min(DEFAULT_TOKENS, limit) if isinstance(limit, int) and limit > 0 else DEFAULT_TOKENS
        return ExampleSpec((1, tokens), torch.long, "the model's config")
    return None


def _from_first_layer(model: nn.Module, float_dtype: torch.dtype) -> ExampleSpec | None:
    for module in model.modules():
        if next(module.children(), None) is not None:
            continue
        if isinstance(module, nn.Embedding):
            return ExampleSpec((1, DEFAULT_TOKENS), torch.long, "its first layer, an Embedding")
        if isinstance(module, nn.Conv2d):
            side = DEFAULT_IMAGE_SIZE
            return ExampleSpec((1, module.in_channels, side, side), float_dtype, "its first layer, a Conv2d")
        if isinstance(module, nn.Conv1d):
            return ExampleSpec((1, module.in_channels, 1024), float_dtype, "its first layer, a Conv1d")
        if isinstance(module, nn.Linear):
            return ExampleSpec((1, module.in_features), float_dtype, "its first layer, a Linear")
    return None


def _stated_image_size(model: nn.Module) -> ExampleSpec | None:
    """A vision transformer's image size (torchvision's ``image_size``, timm's ``patch_embed.img_size``)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        return None
    patch_embed: Any = getattr(model, "patch_embed", None)
    for size in (getattr(model, "image_size", None), getattr(patch_embed, "img_size", None)):
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            size = (size, size)
        pair = _ints(size)
        if pair is not None and len(pair) == 2:
            return ExampleSpec((1, first.in_channels, *pair), first.weight.dtype, "the model's image size")
    return None


def example_spec(model: nn.Module, given: Tensor | Sequence[int] | None = None) -> ExampleSpec | None:
    """The example batch ``model`` is traced with (see the module docstring), or None if nothing says.

    Raises:
        ConfigError: ``given`` is neither a tensor nor a sequence of positive ints.
    """
    floating = (p.dtype for p in model.parameters() if p.is_floating_point())
    float_dtype = next(floating, torch.get_default_dtype())
    if isinstance(given, Tensor):
        return ExampleSpec(tuple(given.shape), given.dtype, "example_input")
    if given is not None:
        shape = _ints(given)
        if shape is None:
            raise ConfigError(
                f"example_input must be a tensor or a batch shape such as (1, 3, 224, 224), got {given!r}"
            )
        return ExampleSpec(shape, float_dtype, "example_input")
    declared = _ints(getattr(model, "input_shape", None))
    if declared is not None:
        return ExampleSpec((1, *declared), float_dtype, "the model's input_shape")
    from_config = _from_config(model, float_dtype)
    if from_config is not None:
        return from_config
    stated = _stated_image_size(model)
    if stated is not None:
        return stated
    pretrained: Any = getattr(model, "pretrained_cfg", None)
    if isinstance(pretrained, dict):
        size = _ints(pretrained.get("input_size"))
        if size is not None and len(size) == 3:
            return ExampleSpec((1, *size), float_dtype, "the model's pretrained_cfg")
    return _from_first_layer(model, float_dtype)
