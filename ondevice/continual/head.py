"""The classifier head of a learner's model: finding it, growing it, carrying the optimizer state over.

Class-incremental learning grows the head when a label it has no row for arrives. The old rows are kept
exactly (:meth:`~ondevice.models.ClassifierModel.grow_head`); the new ones are initialised from a seed so
that a restored learner grows identically; a memory-saving head stays one; and the optimizer is rebuilt
over the new parameters with every tensor's state carried over, the grown tensors' state zero-padded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ondevice.errors import ConfigError
from ondevice.models import ClassifierModel
from ondevice.optim import OptimizerConfig, build_optimizer
from ondevice.prepared import PreparedModel

__all__ = ["grow_classifier", "grown_shapes", "linear_head", "rebuild_optimizer"]


def linear_head(model: PreparedModel) -> nn.Linear:
    """The prepared model's classifier head, which must be an :class:`~torch.nn.Linear`."""
    if model.head is None:
        raise ConfigError("the prepared model has no classifier head; pass head=... to ondevice.prepare")
    head = model.model.get_submodule(model.head)
    if not isinstance(head, nn.Linear):
        raise ConfigError(
            f"the head {model.head!r} is a {type(head).__name__}; the learner needs a Linear head"
        )
    return head


def grow_classifier(model: PreparedModel, num_classes: int, *, seed: int) -> None:
    """Grow the head of ``model`` (a zoo ClassifierModel inside) to ``num_classes`` rows, seeded.

    The new rows are drawn from ``seed`` and ``num_classes`` in a forked generator (the global one is
    left as it was); a memory-saving head is wrapped with the model's ops again.
    """
    inner = model.model
    if not isinstance(inner, ClassifierModel) or model.head != "classifier":
        raise ConfigError(
            f"growing the head needs a zoo ClassifierModel whose head is 'classifier', got "
            f"{type(inner).__name__} with head {model.head!r}; size the head up front with "
            f"replace_head(n) and use LearnerConfig(grow_head=False)"
        )
    old_head = linear_head(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + num_classes)
        new_head = inner.grow_head(num_classes)
    if type(old_head) is not nn.Linear:
        setattr(inner, "classifier", model.with_ops(new_head))  # noqa: B010  (a wrapped head, not a Linear)


def grown_shapes(
    old_params: dict[str, nn.Parameter], new_params: dict[str, nn.Parameter]
) -> dict[str, tuple[int, ...]]:
    """The new shape of every parameter present in both whose shape changed."""
    return {
        name: tuple(p.shape)
        for name, p in new_params.items()
        if name in old_params and tuple(old_params[name].shape) != tuple(p.shape)
    }


def rebuild_optimizer(
    optimizer: torch.optim.Optimizer,
    config: OptimizerConfig,
    params: dict[str, nn.Parameter],
    old_params: dict[str, nn.Parameter],
    *,
    lr: float,
) -> torch.optim.Optimizer:
    """A new optimizer over ``params`` at ``lr``, carrying ``optimizer``'s state over by parameter name.

    A slot shaped like its old parameter is zero-padded along the first dimension to the new shape
    (momentum, Adam's moments); any other slot (a step count) is carried as it is.
    """
    old_state = optimizer.state
    rebuilt = build_optimizer(config, params.values())
    for group in rebuilt.param_groups:
        group["lr"] = lr
    for name, param in params.items():
        old = old_params.get(name)
        if old is None or old not in old_state:
            continue
        carried: dict[str, Any] = {}
        for key, value in old_state[old].items():
            if isinstance(value, Tensor) and value.dim() > 0 and tuple(value.shape) == tuple(old.shape):
                padded = torch.zeros_like(param.detach())
                padded[: value.shape[0]] = value
                carried[key] = padded
            else:
                carried[key] = value
        rebuilt.state[param] = carried
    return rebuilt
