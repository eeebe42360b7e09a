"""Optimizer settings as data (they ride in checkpoints and Flower ConfigRecords)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from ondevice.errors import ConfigError, UnknownNameError

__all__ = ["OptimizerConfig", "build_optimizer", "resolve_optimizer"]

_KINDS = ("adam", "sgd")


@dataclass(frozen=True)
class OptimizerConfig:
    """SGD (with or without momentum, optionally Nesterov) or Adam.

    Defaults follow the papers this SDK reproduces: TinyTL fine-tunes with Adam; tiny-training with SGD.
    """

    kind: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise UnknownNameError("optimizer", self.kind, _KINDS)
        for attr in ("lr", "momentum", "weight_decay", "eps"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or value != value:
                raise ConfigError(f"OptimizerConfig.{attr} must be a number >= 0, got {value!r}")
        if self.lr <= 0:
            raise ConfigError(f"OptimizerConfig.lr must be > 0, got {self.lr!r}")
        if self.nesterov and (self.kind != "sgd" or self.momentum <= 0):
            raise ConfigError("Nesterov momentum needs kind='sgd' and momentum > 0")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"OptimizerConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["betas"] = list(self.betas)
        return payload


def resolve_optimizer(spec: OptimizerConfig | str | Mapping[str, Any], **overrides: Any) -> OptimizerConfig:
    """An OptimizerConfig from itself, a kind name (``"adam"``) or a dict; ``overrides`` replace fields."""
    if isinstance(spec, OptimizerConfig):
        base = spec.to_dict()
    elif isinstance(spec, str):
        base = {"kind": spec}
        if spec == "adam":
            base["lr"] = 1e-3
    elif isinstance(spec, Mapping):
        base = dict(spec)
    else:
        raise ConfigError(
            f"optimizer must be an OptimizerConfig, 'sgd', 'adam' or a dict, got {type(spec).__name__}"
        )
    base.update({k: v for k, v in overrides.items() if v is not None})
    known = set(OptimizerConfig.__dataclass_fields__)
    unknown = sorted(set(base) - known)
    if unknown:
        raise ConfigError(f"unknown optimizer field(s) {unknown}; fields are {sorted(known)}")
    if "betas" in base:
        base["betas"] = tuple(base["betas"])
    return OptimizerConfig(**base)


def build_optimizer(config: OptimizerConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The torch optimizer for ``config`` over ``params``."""
    params = list(params)
    if not params:
        raise ConfigError("there is nothing to optimise: the prepared model has no trainable parameter")
    if config.kind == "adam":
        return torch.optim.Adam(
            params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
    return torch.optim.SGD(
        params,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
