"""The checks behind :meth:`Learner.load_state_dict` and the settings :meth:`Learner.restore` rebuilds from.

A learner's state dict is ``(tensors, metadata)``: tensors by prefix (``delta/``, ``optim/``,
``buffer/``, ``reg/``) and JSON metadata (the layout is in :mod:`ondevice.continual.state`). Everything
here reads a state and the learner's parts and raises before anything is changed; nothing here writes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ondevice.continual.buffer import ReplayBuffer, buffer_from_config
from ondevice.continual.config import LearnerConfig
from ondevice.continual.drift import DriftDetector, detector_from_dict
from ondevice.continual.head import linear_head
from ondevice.continual.prequential import LearnerState
from ondevice.continual.regularizers import Regularizer, regularizer_from_dict
from ondevice.errors import CheckpointError, CheckpointMismatchError
from ondevice.optim import OptimizerConfig, decode_optimizer_state, resolve_optimizer
from ondevice.prepared import PreparedModel

__all__ = [
    "CheckedState",
    "LearnerSettings",
    "check_delta",
    "check_setup",
    "check_state",
    "learner_settings",
    "read_counters",
    "strip",
]


def strip(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors whose names start with ``prefix``, by the rest of their names."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def check_setup(
    metadata: Mapping[str, Any],
    *,
    model: PreparedModel,
    config: LearnerConfig,
    optimizer_config: OptimizerConfig,
    parts: Mapping[str, object | None],
    source: str,
) -> None:
    """Refuse a state saved for another model, scheme, head, learner settings or optimizer kind, or one
    that has (or lacks) a part of ``parts`` (``"buffer"``, ``"regularizer"``, ``"drift"``) this learner
    lacks (or has)."""
    model.check_delta_metadata(metadata.get("delta") or {}, source=source)
    if metadata.get("head") != model.head:
        raise CheckpointMismatchError(
            f"{source} has head {metadata.get('head')!r}, this model's head is {model.head!r}"
        )
    if metadata.get("config") != config.to_dict():
        raise CheckpointMismatchError(
            f"{source} was saved by a learner with settings {metadata.get('config')}, this one has "
            f"{config.to_dict()}; use Learner.restore to rebuild it from the checkpoint"
        )
    theirs = (metadata.get("optimizer") or {}).get("config") or {}
    if theirs.get("kind") != optimizer_config.kind:
        raise CheckpointMismatchError(
            f"{source} was trained with optimizer {theirs}, this learner uses "
            f"{optimizer_config.to_dict()}; create the learner with the same optimizer kind"
        )
    for part, own in parts.items():
        if (metadata.get(part) is None) != (own is None):
            has = "has" if metadata.get(part) is not None else "has no"
            raise CheckpointMismatchError(
                f"{source} {has} {part} state but this learner {'has none' if own is None else 'has one'}; "
                f"use Learner.restore to rebuild the learner from the checkpoint"
            )


def check_delta(
    own: Mapping[str, Tensor],
    delta: Mapping[str, Tensor],
    num_classes: int,
    current_classes: int,
    source: str,
) -> None:
    """Check the saved trainable tensors against the learner's (``own``), allowing its head of
    ``current_classes`` rows grown to the saved ``num_classes`` (never shrunk)."""
    if num_classes < current_classes:
        raise CheckpointMismatchError(
            f"{source} has a head of {num_classes} classes but this learner's has {current_classes}; "
            f"load it into a learner built from the same prepared model, before it grew"
        )
    unknown, missing = sorted(set(delta) - set(own)), sorted(set(own) - set(delta))
    if unknown or missing:
        raise CheckpointMismatchError(
            f"{source} has trainable tensors that do not match this learner's model: unexpected "
            f"{unknown[:5]}, missing {missing[:5]}; load it into a learner built from the same model and "
            f"scheme"
        )
    grows = num_classes > current_classes
    for name, value in delta.items():
        mine = tuple(own[name].shape)
        theirs = tuple(value.shape)
        grown_head = grows and mine and theirs[1:] == mine[1:] and mine[0] == current_classes
        if theirs != mine and not (grown_head and theirs[0] == num_classes):
            raise CheckpointMismatchError(
                f"{source}: tensor {name!r} has shape {theirs}, the model expects {mine}"
            )
        if value.is_floating_point() != own[name].is_floating_point():
            raise CheckpointMismatchError(
                f"{source}: tensor {name!r} has dtype {value.dtype}, expected {own[name].dtype}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointMismatchError(f"{source}: tensor {name!r} holds NaN or Inf; refusing to load it")


def read_counters(
    metadata: Mapping[str, Any], *, default_lr: float, source: str
) -> tuple[float, LearnerState]:
    """The saved learning rate (``default_lr`` when absent) and counters."""
    try:
        lr = float((metadata.get("optimizer") or {}).get("lr", default_lr))
        fields = LearnerState.__dataclass_fields__
        state = LearnerState(**{k: v for k, v in (metadata.get("state") or {}).items() if k in fields})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source} has malformed learner counters: {exc}") from None
    return lr, state


@dataclass(frozen=True)
class LearnerSettings:
    """What a learner is built from, as a state records it (fresh parts, no state loaded into them)."""

    config: LearnerConfig
    optimizer: OptimizerConfig
    buffer: ReplayBuffer | None
    regularizer: Regularizer | None
    drift: DriftDetector | None


def learner_settings(metadata: Mapping[str, Any], source: str) -> LearnerSettings:
    """The settings recorded in a state's metadata, as fresh parts to build a learner from."""
    try:
        config = LearnerConfig(**(metadata.get("config") or {}))
        optimizer = resolve_optimizer((metadata.get("optimizer") or {}).get("config") or {})
        buffer = buffer_from_config(metadata["buffer"]["config"]) if metadata.get("buffer") else None
        regularizer = regularizer_from_dict(metadata["regularizer"]) if metadata.get("regularizer") else None
        drift = detector_from_dict(metadata["drift"]) if metadata.get("drift") else None
    except (TypeError, KeyError) as exc:
        raise CheckpointError(f"{source} has malformed learner settings: {exc}") from None
    return LearnerSettings(config, optimizer, buffer, regularizer, drift)


@dataclass(frozen=True)
class CheckedState:
    """A state checked against a learner, ready to copy in: nothing of the learner is changed yet.

    ``buffer`` and ``regularizer`` are shallow copies of the learner's with the state loaded (their
    ``load_state`` rebinds attributes, never writes into the live ones); ``drift`` a fresh detector of the
    same kind. Each is None where the learner has none.
    """

    num_classes: int
    delta: dict[str, Tensor]
    optimizer_slots: dict[str, dict[str, Any]]
    lr: float
    counters: LearnerState
    buffer: ReplayBuffer | None
    regularizer: Regularizer | None
    drift: DriftDetector | None


def check_state(
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, Any],
    *,
    model: PreparedModel,
    config: LearnerConfig,
    optimizer_config: OptimizerConfig,
    params: Mapping[str, nn.Parameter],
    buffer: ReplayBuffer | None,
    regularizer: Regularizer | None,
    drift: DriftDetector | None,
    source: str,
) -> CheckedState:
    """Check a whole state against a learner's parts (every check above) and load its buffer and
    regulariser into copies; raises before anything is changed."""
    parts = {"buffer": buffer, "regularizer": regularizer, "drift": drift}
    check_setup(
        metadata, model=model, config=config, optimizer_config=optimizer_config, parts=parts, source=source
    )
    current_classes = int(linear_head(model).out_features)
    num_classes = int(metadata.get("num_classes", current_classes))
    delta = strip(tensors, "delta/")
    check_delta(model.trainable_tensors(), delta, num_classes, current_classes, source)
    scalars = (metadata.get("optimizer") or {}).get("scalars") or {}
    shapes = {name: tuple(delta[name].shape) for name in params if name in delta}  # a grown head's too
    slots = decode_optimizer_state(tensors, scalars, shapes=shapes, source=source)
    lr, counters = read_counters(metadata, default_lr=optimizer_config.lr, source=source)
    loaded_drift = None
    if drift is not None:
        loaded_drift = detector_from_dict(metadata["drift"])
        if type(loaded_drift) is not type(drift):
            raise CheckpointMismatchError(
                f"{source} has a {loaded_drift.kind} drift detector, this learner a {drift.kind}"
            )
    trial_buffer = copy.copy(buffer) if buffer is not None else None
    if trial_buffer is not None:
        trial_buffer.load_state(strip(tensors, "buffer/"), metadata["buffer"])
    trial_reg = copy.copy(regularizer) if regularizer is not None else None
    if trial_reg is not None:
        trial_reg.load_state(strip(tensors, "reg/"), metadata["regularizer"])
    return CheckedState(num_classes, delta, slots, lr, counters, trial_buffer, trial_reg, loaded_drift)
