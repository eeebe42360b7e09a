"""Regularisers against forgetting, over the trainable tensors only: LwF and online EWC.

A regulariser adds a term to the loss of every step (:meth:`Regularizer.loss`), may look at the gradients
after the backward pass (:meth:`Regularizer.after_backward`), and consolidates at the end of each
experience (:meth:`Regularizer.end_experience`). Its state is tensors keyed by trainable-tensor name plus
JSON, so it rides in the learner's safetensors checkpoint. When the classifier head grows, the learner
calls :meth:`Regularizer.resize` so that state over the head keeps its old rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from ondevice.errors import CheckpointError, CheckpointMismatchError, ConfigError, UnknownNameError

__all__ = ["EWCConfig", "LwF", "LwFConfig", "OnlineEWC", "Regularizer", "regularizer_from_dict"]

logger = logging.getLogger(__name__)


def _number(owner: str, name: str, value: object, *, low: float, strict: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not isinstance(value, int | float) or value < low or (strict and value == low):
        raise ConfigError(
            f"{owner}.{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}"
        )


def _pad_rows(tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``tensor`` zero-padded along dim 0 to ``shape`` (the old rows kept)."""
    if tuple(tensor.shape) == shape:
        return tensor
    if tuple(tensor.shape[1:]) != shape[1:] or tensor.shape[0] > shape[0]:
        raise ConfigError(f"cannot grow a tensor of shape {tuple(tensor.shape)} to {shape}")
    out = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    out[: tensor.shape[0]] = tensor
    return out


class Regularizer:
    """Base class of the regularisers (see the module docstring for the protocol)."""

    kind: ClassVar[str] = ""
    config: Any

    def loss(self, model: nn.Module, x: Tensor | None, logits: Tensor) -> Tensor | None:
        """Extra loss for a batch ``x`` whose current logits are ``logits`` (None: nothing to add).

        ``x`` is None when the batch holds replayed latents rather than inputs."""
        return None

    def after_backward(self, params: Mapping[str, nn.Parameter], batch_size: int) -> None:
        """Called after every backward pass, before the optimizer step."""

    def end_experience(self, model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
        """Consolidate at an experience boundary; ``tensors`` are the model's trainable tensors."""

    def resize(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Trainable tensors named in ``shapes`` grew along dim 0 (a grown head)."""

    def state_tensors(self) -> dict[str, Tensor]:
        return {}

    def state_metadata(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.config.to_dict()}

    def load_state(self, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> None:
        if metadata.get("kind") != self.kind or metadata.get("config") != self.config.to_dict():
            raise CheckpointMismatchError(
                f"the checkpoint's regulariser is {metadata.get('kind')} {metadata.get('config')}, this "
                f"learner uses {self.kind} {self.config.to_dict()}; create the learner with the same one"
            )


@dataclass(frozen=True)
class LwFConfig:
    """Learning without Forgetting settings: distillation ``temperature`` and loss ``weight``."""

    temperature: float = 2.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        _number("LwFConfig", "temperature", self.temperature, low=0.0, strict=True)
        _number("LwFConfig", "weight", self.weight, low=0.0, strict=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LwF(Regularizer):
    """Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017, Sec. 3).

    At each experience boundary the trainable tensors are snapshotted as the teacher (frozen tensors are
    shared, so the teacher costs only the trainable bytes). On every new batch the teacher's logits over
    the classes it knew are distilled into the student's logits for those classes:
    ``weight * T^2 * KL(softmax(teacher / T) || softmax(student[:, :k] / T))`` (Hinton et al. 2015's
    scaling, so the gradient size does not depend on ``T``).
    """

    kind: ClassVar[str] = "lwf"

    def __init__(self, temperature: float = 2.0, weight: float = 1.0) -> None:
        self.config = LwFConfig(temperature, weight)
        self.teacher: dict[str, Tensor] = {}

    def loss(self, model: nn.Module, x: Tensor | None, logits: Tensor) -> Tensor | None:
        if x is None or not self.teacher or self.config.weight == 0:
            return None
        # No running statistic may change while the teacher runs; every module's own mode is restored
        # after (``model.train()`` would also flip the frozen norms a prepared model keeps in eval).
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                old = functional_call(model, dict(self.teacher), (x,), strict=False)
        finally:
            for module, training in modes:
                module.training = training
        k = min(old.shape[-1], logits.shape[-1])
        temperature = self.config.temperature
        target = F.softmax(old[:, :k] / temperature, dim=-1)
        log_student = F.log_softmax(logits[:, :k] / temperature, dim=-1)
        kd = F.kl_div(log_student, target, reduction="batchmean") * temperature**2
        return self.config.weight * kd

    def end_experience(self, model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
        self.teacher = {name: t.detach().clone() for name, t in tensors.items()}

    def state_tensors(self) -> dict[str, Tensor]:
        return {f"teacher/{name}": t for name, t in self.teacher.items()}

    def load_state(self, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> None:
        super().load_state(tensors, metadata)
        self.teacher = {
            k.removeprefix("teacher/"): v.clone() for k, v in tensors.items() if k.startswith("teacher/")
        }


@dataclass(frozen=True)
class EWCConfig:
    """Online EWC settings: penalty strength ``lambda_`` and Fisher decay ``gamma`` (1.0: plain sum)."""

    lambda_: float = 100.0
    gamma: float = 1.0

    def __post_init__(self) -> None:
        _number("EWCConfig", "lambda_", self.lambda_, low=0.0, strict=False)
        _number("EWCConfig", "gamma", self.gamma, low=0.0, strict=False)
        if self.gamma > 1:
            raise ConfigError(f"EWCConfig.gamma must be in [0, 1], got {self.gamma!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class OnlineEWC(Regularizer):
    """Online elastic weight consolidation over the trainable tensors (Kirkpatrick et al., PNAS 2017;
    the online form of Schwarz et al., ICML 2018, "Progress & Compress", Sec. 3).

    Penalty: ``lambda_ / 2 * sum_i F_i (theta_i - theta*_i)^2`` with one running diagonal Fisher ``F``
    and one anchor ``theta*``. During an experience the Fisher of the current task is estimated from the
    task-loss gradients the learner computes anyway (the penalty's own, known gradient is subtracted):
    ``F_cur = mean over steps of B * g^2`` for mini-batch gradient ``g`` of batch size ``B`` (the
    empirical Fisher when per-sample gradients are uncorrelated; the running estimate of "EWC++",
    Chaudhry et al., ECCV 2018). At the end of the experience ``F <- gamma * F + F_cur`` and
    ``theta* <- theta``.
    """

    kind: ClassVar[str] = "ewc"

    def __init__(self, lambda_: float = 100.0, gamma: float = 1.0) -> None:
        self.config = EWCConfig(lambda_, gamma)
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        self.current: dict[str, Tensor] = {}
        self.steps = 0

    def loss(self, model: nn.Module, x: Tensor | None, logits: Tensor) -> Tensor | None:
        if not self.anchor or self.config.lambda_ == 0:
            return None
        params = dict(model.named_parameters())
        total = logits.new_zeros(())
        for name, anchor in self.anchor.items():
            param = params.get(name)
            if param is None or not param.requires_grad:
                continue
            total = total + (self.fisher[name] * (param - anchor) ** 2).sum()
        return 0.5 * self.config.lambda_ * total

    def after_backward(self, params: Mapping[str, nn.Parameter], batch_size: int) -> None:
        self.steps += 1
        for name, param in params.items():
            if param.grad is None:
                continue
            grad = param.grad.detach()
            if name in self.anchor and self.config.lambda_:
                grad = grad - self.config.lambda_ * self.fisher[name] * (param.detach() - self.anchor[name])
            estimate = batch_size * grad**2
            previous = self.current.get(name)
            if previous is None or previous.shape != estimate.shape:
                previous = (
                    torch.zeros_like(estimate)
                    if previous is None
                    else _pad_rows(previous, tuple(estimate.shape))
                )
            self.current[name] = previous + (estimate - previous) / self.steps

    def end_experience(self, model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for name, param in params.items():
            new = self.current.get(name, torch.zeros_like(param.detach()))
            old = self.fisher.get(name)
            self.fisher[name] = (
                new if old is None else self.config.gamma * _pad_rows(old, tuple(new.shape)) + new
            )
            self.anchor[name] = param.detach().clone()
        self.current = {}
        self.steps = 0

    def resize(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        for store in (self.fisher, self.anchor, self.current):
            for name, shape in shapes.items():
                if name in store:
                    store[name] = _pad_rows(store[name], shape)

    def state_tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for prefix, store in (("fisher", self.fisher), ("anchor", self.anchor), ("current", self.current)):
            out.update({f"{prefix}/{name}": t for name, t in store.items()})
        return out

    def state_metadata(self) -> dict[str, Any]:
        return {**super().state_metadata(), "steps": self.steps}

    def load_state(self, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> None:
        super().load_state(tensors, metadata)
        stores: dict[str, dict[str, Tensor]] = {"fisher": {}, "anchor": {}, "current": {}}
        for key, value in tensors.items():
            prefix, _, name = key.partition("/")
            if prefix not in stores or not name:
                raise CheckpointError(f"unexpected EWC state tensor {key!r}")
            stores[prefix][name] = value.clone()
        if set(stores["fisher"]) != set(stores["anchor"]):
            raise CheckpointError("EWC state is incomplete: Fisher and anchor name different tensors")
        self.fisher, self.anchor, self.current = stores["fisher"], stores["anchor"], stores["current"]
        self.steps = int(metadata.get("steps", 0))


_REGULARIZERS: dict[str, type[Regularizer]] = {"ewc": OnlineEWC, "lwf": LwF}


def regularizer_from_dict(metadata: Mapping[str, Any]) -> Regularizer:
    """A fresh regulariser from ``state_metadata()`` (its kind and config); load its state separately."""
    kind = metadata.get("kind")
    if kind not in _REGULARIZERS:
        raise UnknownNameError("regulariser", kind, _REGULARIZERS)
    config = dict(metadata.get("config") or {})
    try:
        return _REGULARIZERS[str(kind)](**config)
    except TypeError as exc:
        raise CheckpointError(f"bad {kind} settings {config}: {exc}") from None
