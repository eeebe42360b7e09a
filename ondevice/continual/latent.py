"""Latent replay: store activations at the boundary between the frozen front and the trainable tail.

Latent replay (Pellegrini et al., IROS 2020, "Latent Replay for Real-Time Continual Learning") keeps the
activations of an intermediate layer instead of raw inputs, so a replayed sample skips the frozen front
entirely: only the trainable tail runs on it. Storing them in 8 bits costs little accuracy for 4x less
memory than float32 (Ravaglia et al., IEEE JETCAS 2021, "A TinyML Platform for On-Device Continual
Learning With Quantized Latent Replays").

The boundary is found automatically: the longest prefix of the model's ``features`` children in which
no parameter trains and no running statistic updates (:func:`find_boundary`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ondevice.errors import ConfigError

__all__ = ["LatentSplit", "SampleCodec", "find_boundary", "split_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleCodec:
    """How replayed samples are stored: float32, or 8 bits with an affine scale.

    With ``bits=8`` every value is stored as ``uint8`` ``q = round((x - lo) / scale)`` with ``lo`` and
    ``scale = (hi - lo) / 255`` (float32) taken per sample and per channel (dim 1) for inputs with
    spatial dims, and per sample for flat ``(N, D)`` vectors. Asymmetric, so that post-ReLU activations
    use the full 8 bits. The error per value is at most ``scale / 2``.
    """

    bits: Literal[8, 32] = 32

    def __post_init__(self) -> None:
        if self.bits not in (8, 32):
            raise ConfigError(f"SampleCodec.bits must be 8 or 32, got {self.bits!r}")

    @staticmethod
    def scale_shape(sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample shape of ``lo`` and ``scale``: ``(C,)`` with spatial dims, else ``(1,)``."""
        return (sample_shape[0],) if len(sample_shape) >= 2 else (1,)

    def bytes_per_sample(self, sample_shape: tuple[int, ...]) -> int:
        """Bytes one stored sample takes (values plus, for 8 bits, ``lo`` and ``scale``)."""
        numel = 1
        for s in sample_shape:
            numel *= int(s)
        if self.bits == 32:
            return 4 * numel
        scales = 1
        for s in self.scale_shape(sample_shape):
            scales *= s
        return numel + 2 * 4 * scales

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(values, params)``: float32 values and None, or uint8 values and ``(N, 2, *scale_shape)``."""
        x = x.detach().to(torch.float32)
        if self.bits == 32:
            return x.clone(), None
        n = x.shape[0]
        grouped = x.reshape(n, x.shape[1], -1) if x.dim() >= 3 else x.reshape(n, 1, -1)
        lo = grouped.amin(dim=2, keepdim=True)
        hi = grouped.amax(dim=2, keepdim=True)
        scale = (hi - lo) / 255.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((grouped - lo) / safe).clamp_(0, 255).to(torch.uint8).reshape(x.shape)
        params = torch.stack([lo.squeeze(2), scale.squeeze(2)], dim=1)  # (N, 2, groups)
        return q, params

    def decode(self, values: Tensor, params: Tensor | None) -> Tensor:
        """Float32 samples back from :meth:`encode`'s output."""
        if self.bits == 32:
            return values.to(torch.float32)
        if params is None:
            raise ConfigError("8-bit samples need their (lo, scale) parameters to be decoded")
        n = values.shape[0]
        grouped = values.reshape(n, values.shape[1], -1) if values.dim() >= 3 else values.reshape(n, 1, -1)
        lo, scale = params[:, 0].unsqueeze(2), params[:, 1].unsqueeze(2)
        return (grouped.to(torch.float32) * scale + lo).reshape(values.shape)


def find_boundary(model: nn.Module, *, trainable_buffers: tuple[str, ...] = ()) -> int:
    """Number of leading children of ``model.features`` that are entirely frozen.

    A child counts as frozen when none of its parameters (or its descendants') requires a gradient and
    none of its buffers is listed in ``trainable_buffers`` (qualified names inside ``model``, e.g. the
    running statistics of norms that update). ``model`` must have an ``nn.Sequential`` ``features`` (every
    zoo model has).
    """
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise ConfigError(
            f"latent replay needs a model whose 'features' is an nn.Sequential followed by 'classifier' "
            f"(a zoo ClassifierModel), got {type(model).__name__}; use raw replay for other models"
        )
    updating = set(trainable_buffers)
    boundary = 0
    for index, child in enumerate(features.children()):
        if any(p.requires_grad for p in child.parameters()):
            break
        prefix = f"features.{index}."
        if any(name.startswith(prefix) for name in updating):
            break
        boundary += 1
    return boundary


class LatentSplit:
    """A zoo model seen as ``tail(front(x))``, with ``front = features[:boundary]``.

    The tail is looked up on every call, so it follows a head that was grown or replaced.
    """

    def __init__(self, model: nn.Module, boundary: int) -> None:
        features = getattr(model, "features", None)
        if not isinstance(features, nn.Sequential) or not isinstance(
            getattr(model, "classifier", None), nn.Module
        ):
            raise ConfigError(
                "latent replay needs a zoo ClassifierModel (features + classifier), got "
                f"{type(model).__name__}"
            )
        if not 0 <= boundary <= len(features):
            raise ConfigError(f"boundary must be in 0..{len(features)}, got {boundary}")
        self.model = model
        self.boundary = int(boundary)

    @torch.no_grad()
    def front(self, x: Tensor) -> Tensor:
        """Activations at the boundary (no graph is built: nothing in the front trains)."""
        features: nn.Sequential = self.model.features  # type: ignore[assignment]
        for layer in list(features.children())[: self.boundary]:
            x = layer(x)
        return x

    def tail(self, z: Tensor) -> Tensor:
        """Logits from boundary activations: the rest of ``features``, then the classifier."""
        features: nn.Sequential = self.model.features  # type: ignore[assignment]
        for layer in list(features.children())[self.boundary :]:
            z = layer(z)
        return self.model.classifier(z)  # type: ignore[operator]


def split_model(model: nn.Module, *, trainable_buffers: tuple[str, ...] = ()) -> LatentSplit:
    """:class:`LatentSplit` at the automatically found boundary (:func:`find_boundary`)."""
    boundary = find_boundary(model, trainable_buffers=trainable_buffers)
    if boundary == 0:
        logger.warning(
            "latent replay: the first child of %s.features trains, so the latent is the input itself; "
            "choose a scheme that freezes the front (last_layer, sparse) to skip it",
            type(model).__name__,
        )
    return LatentSplit(model, boundary)
