"""The model zoo: ``create_model(name, **kwargs)`` over a registry of small, standard-layer classifiers.

Registered models: ``"cnn"``, ``"cnn1d"``, ``"mcunet"``, ``"mobilenetv2"``, ``"vit"``. Every model is a
:class:`ClassifierModel` (``classifier(features(x))``) built only from standard torch layers.
"""

from __future__ import annotations

from ondevice.models.base import ClassifierModel
from ondevice.models.blocks import (
    ConvBNAct,
    ConvBNAct1d,
    InvertedResidual,
    block_types,
    make_divisible,
    register_block,
)
from ondevice.models.registry import create_model, list_models, model_defaults, register_model

# The built-in models register themselves on import. Python runs this package's __init__ before any of
# its submodules, so the zoo is populated whichever module of it a caller imports first; registry.py
# does not import the zoo (no import cycle).
from ondevice.models import cnn, cnn1d, mcunet, mobilenetv2, vit  # noqa: F401  isort: skip

__all__ = [
    "ClassifierModel",
    "ConvBNAct",
    "ConvBNAct1d",
    "InvertedResidual",
    "block_types",
    "create_model",
    "list_models",
    "make_divisible",
    "model_defaults",
    "register_block",
    "register_model",
]
