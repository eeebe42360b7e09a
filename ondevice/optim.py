"""Optimizer settings as data (they ride in checkpoints and Flower ConfigRecords), and the one codec of
optimizer state in checkpoints (:class:`~ondevice.Trainer` and :class:`~ondevice.continual.Learner` files).

In a checkpoint, an optimizer's state is keyed by trainable-tensor name, never by position: tensor slots
(momentum buffers, Adam's moments, its step) are tensors named ``optim/<name>/<slot>``, other slots ride in
the metadata as ``{name: {slot: value}}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ondevice.errors import CheckpointMismatchError, ConfigError, UnknownNameError

__all__ = [
    "OPTIMIZER_PREFIX",
    "LeanAdam",
    "LeanSGD",
    "OptimizerConfig",
    "build_optimizer",
    "decode_optimizer_state",
    "encode_optimizer_state",
    "resolve_optimizer",
]

#: Prefix of optimizer-state tensors in a checkpoint: ``optim/<trainable name>/<slot>``.
OPTIMIZER_PREFIX = "optim/"

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
    """The optimizer for ``config`` over ``params``.

    On CPU it is :class:`LeanSGD` / :class:`LeanAdam`: the same update as ``torch.optim.SGD`` / ``Adam``
    (bit for bit: their single-tensor code, which torch runs on CPU), without importing ``torch._dynamo``,
    which torch's optimizers do on construction (about 70 MiB of resident memory, more than a small
    model's whole training step; bench/README.md). Parameters on another device get torch's own optimizer
    and its fused multi-tensor kernels.
    """
    params = list(params)
    if not params:
        raise ConfigError("there is nothing to optimise: the prepared model has no trainable parameter")
    lean = all(p.device.type == "cpu" for p in params)
    if config.kind == "adam":
        adam = LeanAdam if lean else torch.optim.Adam
        return adam(
            params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
    sgd = LeanSGD if lean else torch.optim.SGD
    return sgd(
        params,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )


class _Lean(torch.optim.Optimizer):
    """A torch optimizer whose construction, ``zero_grad`` and ``step`` never import ``torch._dynamo``.

    torch wraps ``Optimizer.add_param_group`` and ``zero_grad`` in ``torch._disable_dynamo``, which imports
    the compiler stack on first call; these overrides do the same work without it. It stays a
    ``torch.optim.Optimizer`` (learning-rate schedulers accept it); ``state_dict``/``load_state_dict``
    are torch's own (and do import it; ondevice's checkpoints use :func:`encode_optimizer_state`).
    """

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        seen = {id(p) for group in self.param_groups for p in group["params"]}
        for param in params:
            if not isinstance(param, Tensor) or not param.is_leaf:
                raise ValueError(
                    f"{type(self).__name__} can only optimise leaf tensors, got {type(param).__name__}"
                )
            if id(param) in seen:
                raise ValueError("some parameters appear in more than one parameter group")
            seen.add(id(param))
        group = {**self.defaults, **param_group, "params": params}
        self.param_groups.append(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.detach_().requires_grad_(False)
                    param.grad.zero_()


class LeanSGD(_Lean):
    """``torch.optim.SGD`` (momentum, Nesterov, weight decay; no dampening) without ``torch._dynamo``.

    The update is torch's single-tensor SGD, operation for operation, so results are bit-identical on CPU.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay}
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if decay != 0:
                    grad = grad.add(param, alpha=decay)
                if momentum != 0:
                    state = self.state[param]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = grad.detach().clone()
                    else:
                        buf.mul_(momentum).add_(grad, alpha=1)
                    grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
                param.add_(grad, alpha=-lr)


class LeanAdam(_Lean):
    """``torch.optim.Adam`` (Kingma and Ba 2015; L2 weight decay, no AMSGrad) without ``torch._dynamo``.

    The update is torch's single-tensor Adam, operation for operation (the step count a float tensor as in
    torch), so results and state are bit-identical on CPU.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=step_dtype)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                grad = param.grad
                exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                step_t += 1
                if decay != 0:
                    grad = grad.add(param, alpha=decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = step_t.item()
                step_size = lr / (1 - beta1**step)
                bias_correction2_sqrt = (1 - beta2**step) ** 0.5
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                param.addcdiv_(exp_avg, denom, value=-step_size)


def encode_optimizer_state(
    optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter]
) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """``optimizer``'s state by the names of ``params``: tensor slots as ``"optim/<name>/<slot>"``, and the
    other slots (numbers) as ``{name: {slot: value}}`` for JSON metadata."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    by_param = {id(p): name for name, p in params.items()}
    for param, slots in optimizer.state.items():
        name = by_param[id(param)]
        for slot, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"{OPTIMIZER_PREFIX}{name}/{slot}"] = value
            else:
                scalars.setdefault(name, {})[slot] = value
    return tensors, scalars


def decode_optimizer_state(
    tensors: Mapping[str, Tensor],
    scalars: Mapping[str, Any],
    *,
    shapes: Mapping[str, tuple[int, ...]],
    source: str,
) -> dict[str, dict[str, Any]]:
    """Saved optimizer state (what :func:`encode_optimizer_state` wrote) by trainable-tensor name, checked.

    Args:
        tensors: a checkpoint's tensors; only the ``optim/`` ones are read (cloned).
        scalars: the saved non-tensor slots.
        shapes: the shape of every tensor the state may belong to, by name; a slot of more than one element
            must have its tensor's shape.
        source: names the checkpoint in errors.

    Raises:
        CheckpointMismatchError: state for a tensor not in ``shapes``, or of another shape.
    """
    slots_by_name: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith(OPTIMIZER_PREFIX):
            continue
        name, _, slot = key[len(OPTIMIZER_PREFIX) :].rpartition("/")
        if name not in shapes:
            raise CheckpointMismatchError(f"{source} has optimizer state for unknown tensor {name!r}")
        if value.numel() > 1 and tuple(value.shape) != tuple(shapes[name]):
            raise CheckpointMismatchError(
                f"{source} has optimizer state {slot!r} of shape {tuple(value.shape)} for {name!r}, whose "
                f"shape is {tuple(shapes[name])}"
            )
        slots_by_name.setdefault(name, {})[slot] = value.clone()
    for name, slots in scalars.items():
        if name not in shapes or not isinstance(slots, dict):
            raise CheckpointMismatchError(f"{source} has optimizer state for unknown tensor {name!r}")
        slots_by_name.setdefault(name, {}).update(slots)
    return slots_by_name
