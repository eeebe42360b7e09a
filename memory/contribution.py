"""Contribution analysis: how much accuracy each part of a sparse update buys (tiny-training, Sec. 3.2).

Lin et al. (NeurIPS 2022, "On-Device Training Under 256KB Memory", Sec. 3.2) fine-tune, one at a time,
the biases of the last ``k`` layers (``bias_gain[k]``) and the weights of each layer ``i`` on a fraction
``r`` of its input channels (``weight_gain[i, r]``), measure the accuracy gain of each over updating the
classifier alone, and assume the gains add up:

    gain(k, {(i, r)}) = bias_gain[k] + sum_i weight_gain[i, r_i]

:class:`Contributions` holds those tables; :func:`prior_contributions` fills them without data from the
paper's observations, :func:`measure_contributions` by briefly fine-tuning on a little held-out data.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ondevice import prepare
from ondevice.errors import ConfigError, OnDeviceError
from ondevice.loop import optimizer_step
from ondevice.schemes import Sparse

__all__ = [
    "NAMED_PRIOR",
    "Contributions",
    "LayerInfo",
    "measure_contributions",
    "prior_contributions",
]

logger = logging.getLogger(__name__)

NAMED_PRIOR: dict[str, float] = {"last_layer": 0.0, "bias": 0.53, "lite_residual": 0.81, "full": 1.0}
"""Prior gains of the named schemes, relative to full fine-tuning (= 1) over the last layer (= 0): the
means over Flowers, Cars, Aircraft and CIFAR-10 of TinyTL's Table (Cai et al. 2020, Table 1 with
ProxylessNAS-Mobile): bias-only recovers 53 % of full fine-tuning's gain, lite residual + bias 81 %."""

_BIAS_SHARE = NAMED_PRIOR["bias"]
_BIAS_CURVE = 4.0  # saturation of the bias curve: the last quarter of the layers gives ~63 % of it


@dataclass(frozen=True)
class LayerInfo:
    """What the planner knows of one layer of the Sparse layer list (Conv/Linear leaves, head excluded)."""

    name: str
    index: int
    in_channels: int
    groups: int
    kernel_numel: int
    first_pointwise: bool


@dataclass(frozen=True)
class Contributions:
    """Additive accuracy gains of a sparse update's parts (tiny-training, Sec. 3.2).

    Attributes:
        bias_gain: ``bias_gain[k]`` for ``k = 0 .. n`` (biases of the last ``k`` layers; ``[0] == 0``).
        weight_gain: ``(layer index, ratio) -> gain`` of training that layer's weight on ``ratio`` of its
            input channels.
        named_gain: gains of the named schemes (``last_layer``, ``bias``, ``lite_residual``, ``full``).
        source: ``"prior"`` (relative units, full fine-tuning = 1) or ``"measured"`` (accuracy points
            gained over fine-tuning the classifier alone, as fractions).
    """

    bias_gain: tuple[float, ...]
    weight_gain: dict[tuple[int, float], float] = field(default_factory=dict)
    named_gain: dict[str, float] = field(default_factory=dict)
    source: Literal["prior", "measured"] = "prior"

    def __post_init__(self) -> None:
        if not self.bias_gain:
            raise ConfigError("Contributions.bias_gain needs an entry for k = 0")
        if self.source not in ("prior", "measured"):
            raise ConfigError(f"Contributions.source must be 'prior' or 'measured', got {self.source!r}")

    def gain(self, bias_k: int, weights: Sequence[tuple[int, float]]) -> float:
        """The additive gain of training the last ``bias_k`` biases and ``weights`` ((layer, ratio) pairs)."""
        return self.bias_gain[bias_k] + sum(self.weight_gain.get(w, 0.0) for w in weights)


def _position_weight(info: LayerInfo, n: int) -> float:
    """Prior weight of a layer: later layers and each block's first point-wise conv contribute most."""
    position = (info.index + 1) / n
    kind = 2.0 if info.first_pointwise else (0.25 if info.groups > 1 else 1.0)
    return kind * position**2


def prior_contributions(layers: Sequence[LayerInfo], ratios: Sequence[float]) -> Contributions:
    """Gains without data, from tiny-training's observations (Lin et al. 2022, Sec. 3.2 and Fig. 3).

    * biases: ``bias_gain[k] = 0.53 (1 - exp(-4 k / n)) / (1 - exp(-4))`` -- cheap, rising with depth and
      saturating; all biases are worth TinyTL's bias-only share (0.53 of full fine-tuning, NAMED_PRIOR);
    * weights: ``weight_gain[i, r] = 0.47 * w_i * sqrt(r) / sum_j w_j`` with ``w_i = kind_i * ((i+1)/n)^2``
      (later layers contribute more), ``kind`` 2 for a block's first point-wise conv (the paper's
      strongest), 0.25 for depth-wise convs (weakest), 1 otherwise; ``sqrt(r)``: a fraction of the
      channels recovers most of a layer's gain (the paper's ratio trade-off).

    Units are relative: full fine-tuning (every bias and weight) scores 1.
    """
    n = len(layers)
    if n == 0:
        return Contributions(bias_gain=(0.0,), named_gain=dict(NAMED_PRIOR))
    norm = 1 - math.exp(-_BIAS_CURVE)
    bias = tuple(_BIAS_SHARE * (1 - math.exp(-_BIAS_CURVE * k / n)) / norm for k in range(n + 1))
    weights = {info.index: _position_weight(info, n) for info in layers}
    total = sum(weights.values()) or 1.0
    weight_gain = {
        (info.index, float(r)): (1 - _BIAS_SHARE) * weights[info.index] * math.sqrt(r) / total
        for info in layers
        for r in ratios
        if r >= 1.0 or info.groups == 1
    }
    return Contributions(bias_gain=bias, weight_gain=weight_gain, named_gain=dict(NAMED_PRIOR))


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=-1) == y).float().mean())


def finetune_accuracy(
    model: nn.Module,
    scheme: object,
    data: tuple[Tensor, Tensor],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> float:
    """Accuracy on the second half of ``data`` after ``steps`` SGD steps on the first half under ``scheme``.

    The short fine-tuning run of tiny-training's contribution analysis (Lin et al. 2022, Sec. 3.2).
    """
    x, y = data
    half = max(1, len(x) // 2)
    train_x, train_y, val_x, val_y = x[:half], y[:half], x[half:], y[half:]
    if len(val_x) == 0:
        val_x, val_y = train_x, train_y
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prepared = prepare(copy.deepcopy(model), scheme, copy_model=False)  # type: ignore[arg-type]
    params = list(prepared.trainable_parameters().values())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    opt.zero_grad(set_to_none=True)  # gradients the copied model may carry
    for _ in range(steps):
        prepared.train()
        idx = torch.randint(0, len(train_x), (min(batch_size, len(train_x)),), generator=generator)
        optimizer_step(nn.functional.cross_entropy(prepared(train_x[idx]), train_y[idx]), opt)
    return _accuracy(prepared, val_x, val_y)


def measure_contributions(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    data: tuple[Tensor, Tensor],
    *,
    ratios: Sequence[float],
    bias_depths: Sequence[int] | None = None,
    weight_layers: Sequence[int] | None = None,
    named: Sequence[str] = ("bias", "lite_residual", "full"),
    steps: int = 30,
    lr: float = 0.05,
    batch_size: int = 16,
    seed: int = 0,
) -> Contributions:
    """Measure each part's accuracy gain by briefly fine-tuning (tiny-training's contribution analysis).

    Gains are over fine-tuning the classifier alone (``Sparse(bias_last_k=0, weight_layers=())``), each run
    from the same pretrained weights, seed and batches; ``data`` is split in halves (train, evaluate).
    ``bias_depths`` (default: about 6 depths spread over ``0..n``) are measured and linearly interpolated
    in between; ``weight_layers`` (default: every layer) each get every allowed ratio. A named scheme that
    cannot be prepared for the model is left out.
    """
    x, y = data
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or len(x) != len(y) or len(x) < 2:
        raise ConfigError("data must be a pair (x, y) of tensors with the same length >= 2")
    n = len(layers)
    run = {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed}
    base = finetune_accuracy(model, Sparse(bias_last_k=0, weight_layers=()), data, **run)  # type: ignore[arg-type]
    depths = sorted(set(bias_depths if bias_depths is not None else _depth_grid(n)) | {0, n})
    measured = {0: 0.0}
    for k in depths:
        if k > 0:
            acc = finetune_accuracy(model, Sparse(bias_last_k=k, weight_layers=()), data, **run)  # type: ignore[arg-type]
            measured[k] = acc - base
    bias = tuple(_interpolate(measured, k) for k in range(n + 1))
    chosen = set(range(n) if weight_layers is None else weight_layers)
    weight_gain: dict[tuple[int, float], float] = {}
    for info in layers:
        if info.index not in chosen:
            continue
        for r in ratios:
            if r < 1.0 and info.groups != 1:
                continue
            scheme = Sparse(bias_last_k=0, weight_layers=(info.index,), channel_ratios=(float(r),))
            weight_gain[(info.index, float(r))] = finetune_accuracy(model, scheme, data, **run) - base  # type: ignore[arg-type]
    named_gain = {"last_layer": 0.0}
    for name in named:
        try:
            named_gain[name] = finetune_accuracy(model, name, data, **run) - base  # type: ignore[arg-type]
        except OnDeviceError as exc:
            logger.info("contribution analysis skips %s: %s", name, exc)
    logger.info(
        "contribution analysis: base accuracy %.3f, %d runs",
        base,
        len(depths) + len(weight_gain) + len(named),
    )
    return Contributions(bias_gain=bias, weight_gain=weight_gain, named_gain=named_gain, source="measured")


def _depth_grid(n: int) -> list[int]:
    return sorted({round(n * f) for f in (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)})


def _interpolate(points: dict[int, float], k: int) -> float:
    if k in points:
        return points[k]
    lower = max(p for p in points if p < k)
    upper = min(p for p in points if p > k)
    t = (k - lower) / (upper - lower)
    return points[lower] + t * (points[upper] - points[lower])
