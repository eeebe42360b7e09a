"""``ClassifierModel``: the one shape every model of the zoo has, ``classifier(features(x))``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ondevice.errors import ConfigError, InputShapeError

__all__ = ["ClassifierModel"]


class ClassifierModel(nn.Module):
    """A backbone ``features`` (input -> flat ``(N, feature_dim)``) followed by a linear ``classifier``.

    Attributes:
        features: maps a batch of shape ``(N, *input_shape)`` to ``(N, feature_dim)``; it ends with
            global pooling and flatten (or the class token for a ViT).
        classifier: a plain :class:`torch.nn.Linear` ``(feature_dim -> num_classes)``.
        num_classes: rows of the classifier.
        feature_dim: width of the feature vector.
        input_shape: per-sample input shape, e.g. ``(3, 128, 128)`` or ``(1, 64)``.
        model_name, model_kwargs: how :func:`~ondevice.models.create_model` built it ("" and ``{}``
            when constructed directly).
    """

    def __init__(
        self,
        features: nn.Module,
        *,
        feature_dim: int,
        num_classes: int,
        input_shape: tuple[int, ...],
        head_init_std: float = 0.01,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        self.features = features
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.head_init_std = float(head_init_std)
        self.model_name = ""
        self.model_kwargs: dict[str, Any] = {}
        self.classifier = self._new_head(self.num_classes)

    def _new_head(self, num_classes: int) -> nn.Linear:
        """A freshly initialised head: weights N(0, head_init_std^2), zero bias (as torchvision)."""
        ref = next(self.features.parameters(), None)
        head = nn.Linear(self.feature_dim, num_classes)
        if ref is not None:
            head = head.to(device=ref.device, dtype=ref.dtype)
        nn.init.normal_(head.weight, 0.0, self.head_init_std)
        nn.init.zeros_(head.bias)
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``classifier(features(x))`` of shape ``(N, num_classes)``."""
        if isinstance(x, torch.Tensor):
            self.check_input(x)
        return self.classifier(self.features(x))

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`~ondevice.errors.InputShapeError` unless ``x`` is ``(N, C, ...)`` with the right
        number of dimensions and channels."""
        expected = len(self.input_shape) + 1
        if x.dim() != expected or x.shape[1] != self.input_shape[0]:
            raise InputShapeError(
                f"{type(self).__name__} expects a batch of shape (N, {', '.join(map(str, self.input_shape))})"
                f", got {tuple(x.shape)}; add a batch dimension with x.unsqueeze(0) or fix the channel count"
            )

    @torch.no_grad()
    def replace_head(self, num_classes: int) -> nn.Linear:
        """Replace ``classifier`` by a freshly initialised ``nn.Linear(feature_dim, num_classes)``."""
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        self.classifier = self._new_head(num_classes)
        self.num_classes = int(num_classes)
        return self.classifier

    @torch.no_grad()
    def grow_head(self, num_classes: int) -> nn.Linear:
        """Grow ``classifier`` to ``num_classes`` rows, keeping the existing rows exactly.

        New rows are initialised like a fresh head; the logits of the old classes are unchanged because
        each logit depends on its own row only. Shrinking raises :class:`~ondevice.errors.ConfigError`.
        """
        old = self.classifier
        if num_classes < old.out_features:
            raise ConfigError(
                f"grow_head cannot shrink the head from {old.out_features} to {num_classes} classes; "
                f"use replace_head({num_classes}) for a fresh head"
            )
        if num_classes == old.out_features:
            return old
        new = self._new_head(num_classes).to(device=old.weight.device, dtype=old.weight.dtype)
        new.weight[: old.out_features].copy_(old.weight)
        new.bias[: old.out_features].copy_(old.bias)
        new.weight.requires_grad_(old.weight.requires_grad)
        new.bias.requires_grad_(old.bias.requires_grad)
        self.classifier = new
        self.num_classes = int(num_classes)
        return new
