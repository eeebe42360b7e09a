"""Layers without a memory-saving op: which they are, what they keep, and the one warning prepare gives.

They run on stock autograd, keeping what stock PyTorch keeps; ``prepare`` lists them in its report with
the bytes each keeps on an example batch (counted on fake tensors, ``ondevice._kept``) and warns once.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

from torch import nn

from ondevice._example import ExampleSpec
from ondevice._kept import kept_bytes
from ondevice.errors import StockAutogradWarning
from ondevice.ops import supported_types, unsupported_leaves

__all__ = ["StockLayer", "stock_autograd_layers", "stock_layers", "warn_stock"]

logger = logging.getLogger(__name__)


def stock_autograd_layers(model: nn.Module) -> dict[str, str]:
    """Layers of ``model`` that hold parameters but have no memory-saving op: qualified name -> type name.

    They run on stock autograd. Layers are leaves, or variants of a layer type that has an op (a
    subclass with a ``forward`` of its own, which may hold children such as timm's ``BatchNormAct2d``).
    Containers with a ``forward`` of their own that hold a parameter or two (a ViT's class token and
    position embedding) are not layers: their few ops run on stock autograd like any model code.
    """
    layer_types = supported_types()
    return {
        name: kind
        for name, kind in unsupported_leaves(model).items()
        if next(model.get_submodule(name).children(), None) is None
        or isinstance(model.get_submodule(name), layer_types)
    }


@dataclass(frozen=True)
class StockLayer:
    """A layer without a memory-saving op, which runs on stock autograd.

    Attributes:
        name: qualified name inside the prepared model's ``model``.
        type_name: its class.
        kept_bytes: bytes its forward keeps for backward on the report's example batch, or None when the
            model could not be traced (see ``PrepareReport.example``).
        trains: whether any of its own parameters train.
    """

    name: str
    type_name: str
    kept_bytes: int | None
    trains: bool


def stock_layers(model: nn.Module, example: ExampleSpec | None) -> tuple[tuple[StockLayer, ...], str | None]:
    """The layers of a converted model that run on stock autograd, with what they keep on ``example``."""
    found = stock_autograd_layers(model)
    if not found:
        return (), None
    kept: dict[str, int] | None = None
    described = None
    if example is not None:
        described = example.describe()
        try:
            kept = kept_bytes(model, list(found), example)
        except Exception as error:
            logger.info("could not trace %s on %s to count what stock layers keep: %s",
                        type(model).__name__, described, error)  # fmt: skip
            described = f"{described}; not traced: {type(error).__name__}: {error}"
    layers = tuple(
        StockLayer(
            name=name,
            type_name=kind,
            kept_bytes=None if kept is None else kept[name],
            trains=any(p.requires_grad for p in model.get_submodule(name).parameters(recurse=False)),
        )
        for name, kind in found.items()
    )
    return layers, described


def warn_stock(layers: tuple[StockLayer, ...], example: str | None) -> None:
    kinds = sorted({layer.type_name for layer in layers})
    counted = [layer.kept_bytes for layer in layers if layer.kept_bytes is not None]
    cost = f"; together they keep {sum(counted):,} bytes on a {example} batch" if counted else ""
    warnings.warn(
        f"{len(layers)} {'layer' if len(layers) == 1 else 'layers'} without a memory-saving op "
        f"({', '.join(kinds)}) run on stock autograd and keep what stock PyTorch keeps{cost}. "
        f"PreparedModel.report.stock_layers lists them; register an op with ondevice.ops.register_op, or "
        f"pass strict=True to refuse such models",
        StockAutogradWarning,
        stacklevel=3,
    )
