"""A learner's whole state in one safetensors file, written atomically and validated on load.

What one file holds (tensors by prefix, everything else as JSON metadata, never pickle):

- ``delta/<name>``: the trainable tensors (the classifier head at its grown size included);
- ``optim/<name>/<slot>``: optimizer state by trainable-tensor name;
- ``buffer/<key>``: the replay buffer's stored samples and generator state;
- ``reg/<key>``: the regulariser's state (LwF teacher, EWC Fisher and anchor);
- metadata: the delta metadata of :meth:`~ondevice.prepared.PreparedModel.delta_metadata` (format,
  scheme, model fingerprint), head size, learner/optimizer/buffer/regulariser settings, drift detector
  state, counters, the accuracy matrix, a SHA-256 digest of every tensor and the caller's ``extra``.

The write goes through :func:`ondevice.checkpoint.write_tensors` (temporary file, fsync, atomic rename,
fsync of the directory), so a crash or power loss at any moment leaves the previous complete checkpoint
or the new one, never a mix. The file records its kind (``"learner"``, or ``"federated-device-state"``
for a federated device) and a SHA-256 digest over tensors and metadata, so later corruption or a file of
another kind is refused on load; a load validates everything before it changes the learner.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ondevice.checkpoint import (
    KIND_FEDERATED_DEVICE_STATE,
    KIND_LEARNER,
    read_tensors,
    tensor_digest,
    write_tensors,
)
from ondevice.continual.buffer import buffer_from_config
from ondevice.continual.drift import detector_from_dict
from ondevice.continual.regularizers import regularizer_from_dict
from ondevice.errors import CheckpointError, CheckpointMismatchError
from ondevice.optim import resolve_optimizer

if TYPE_CHECKING:
    from ondevice.continual.learner import DriftHook, Learner
    from ondevice.prepared import PreparedModel

__all__ = [
    "LEARNER_FORMAT",
    "load_learner",
    "read_learner_state",
    "restore_learner",
    "save_learner",
    "snapshot_learner",
    "tensor_digest",
    "write_snapshot",
]

logger = logging.getLogger(__name__)

LEARNER_FORMAT = "ondevice.learner/2"
"""Format tag of learner checkpoints. Version 2 added ``LearnerConfig.recipe``/``der_alpha``/``der_beta``
and ``BufferConfig.logits`` (buffers may hold ``buffer/logits``); version 1 files are read by filling
those fields with what version 1 did (:func:`_upgrade_v1`)."""

_LEARNER_FORMAT_V1 = "ondevice.learner/1"

_PREFIXES = ("delta/", "optim/", "buffer/", "reg/")


_KINDS = (KIND_LEARNER, KIND_FEDERATED_DEVICE_STATE)
"""The kinds of file that hold a learner's state: a learner checkpoint, or a federated device's state."""


def _learner_kind(kind: str) -> str:
    if kind not in _KINDS:
        raise CheckpointError(
            f"a learner's state is saved as kind {_KINDS[0]!r} or {_KINDS[1]!r}, got {kind!r}; pass one of "
            f"ondevice.checkpoint.KIND_LEARNER or KIND_FEDERATED_DEVICE_STATE"
        )
    return kind


def _collect(learner: Learner) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {f"delta/{k}": v for k, v in learner.model.trainable_tensors().items()}
    scalars: dict[str, dict[str, Any]] = {}
    by_param = {id(p): name for name, p in learner._params.items()}
    for param, slots in learner.optimizer.state.items():
        name = by_param[id(param)]
        for key, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{name}/{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    metadata: dict[str, Any] = {
        "format": LEARNER_FORMAT,
        "delta": learner.model.delta_metadata(),
        "head": learner.model.head,
        "num_classes": learner.num_classes,
        "config": learner.config.to_dict(),
        "optimizer": {"config": learner.optimizer_config.to_dict(), "scalars": scalars, "lr": learner.lr},
        "state": learner.state.to_dict(),
        "buffer": None,
        "regularizer": None,
        "drift": learner.drift.to_dict() if learner.drift is not None else None,
    }
    if learner.buffer is not None:
        tensors.update({f"buffer/{k}": v for k, v in learner.buffer.state_tensors().items()})
        metadata["buffer"] = learner.buffer.state_metadata()
    if learner.regularizer is not None:
        tensors.update({f"reg/{k}": v for k, v in learner.regularizer.state_tensors().items()})
        metadata["regularizer"] = learner.regularizer.state_metadata()
    return tensors, metadata


def snapshot_learner(
    learner: Learner, *, extra: Mapping[str, Any] | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A detached copy of ``learner``'s state, ``(tensors, metadata)``, its digest in ``metadata["digest"]``.

    :func:`save_learner` writes one; taking it separately lets a caller record the digest first (or send
    the snapshot elsewhere).
    """
    tensors, metadata = _collect(learner)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata["digest"] = tensor_digest(tensors)
    metadata["extra"] = dict(extra or {})
    return tensors, metadata


def write_snapshot(
    path: str | os.PathLike[str],
    snapshot: tuple[dict[str, Tensor], dict[str, Any]],
    *,
    kind: str = KIND_LEARNER,
) -> Path:
    """Write a :func:`snapshot_learner` result to ``path`` atomically, as a checkpoint of ``kind``.

    Raises:
        CheckpointError: ``path`` holds something other than a checkpoint of ``kind`` (left unchanged).
    """
    tensors, metadata = snapshot
    target = write_tensors(path, tensors, metadata, kind=_learner_kind(kind))
    logger.debug("saved learner state (%d tensors) to %s", len(tensors), target)
    return target


def save_learner(
    learner: Learner,
    path: str | os.PathLike[str],
    *,
    extra: Mapping[str, Any] | None = None,
    kind: str = KIND_LEARNER,
) -> Path:
    """Write ``learner``'s state to ``path`` atomically (see the module docstring for the layout)."""
    return write_snapshot(path, snapshot_learner(learner, extra=extra), kind=kind)


def read_learner_state(
    path: str | os.PathLike[str], *, kind: str = KIND_LEARNER
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and check a learner's state file (kind, file digest, format); ``(tensors, metadata)``.

    Raises:
        CheckpointError: missing, truncated, damaged, of another kind, or not a learner's state.
    """
    tensors, metadata = read_tensors(path, kind=_learner_kind(kind))
    source = f"checkpoint {str(path)!r}"
    if metadata.get("format") == _LEARNER_FORMAT_V1:
        metadata = _upgrade_v1(metadata)
    if metadata.get("format") != LEARNER_FORMAT:
        raise CheckpointError(
            f"{source} has format {metadata.get('format')!r}, not a learner state ({LEARNER_FORMAT!r}); "
            f"save it with Learner.save"
        )
    unknown = sorted(k for k in tensors if not k.startswith(_PREFIXES))
    if unknown:
        raise CheckpointError(f"{source} holds unexpected tensors {unknown[:5]}")
    return tensors, metadata


def _upgrade_v1(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Version-1 metadata as version 2: v1 trained the new batch in the first replay step only, which is
    recipe ``"once"`` (identical to the new default ``"er"`` when ``replay_steps`` is 1, so such files
    keep loading into default learners); its buffers kept no logits."""
    from ondevice.continual.learner import LearnerConfig

    upgraded = copy.deepcopy(dict(metadata))
    config = upgraded.get("config")
    if isinstance(config, dict):
        steps = config.get("replay_steps", 1)
        config.setdefault("recipe", "er" if steps == 1 else "once")
        config.setdefault("der_alpha", LearnerConfig.der_alpha)  # unused without logits: the defaults
        config.setdefault("der_beta", LearnerConfig.der_beta)
    buffer = upgraded.get("buffer")
    if isinstance(buffer, dict) and isinstance(buffer.get("config"), dict):
        buffer["config"].setdefault("logits", False)
    upgraded["format"] = LEARNER_FORMAT
    return upgraded


def _strip(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_setup(learner: Learner, metadata: Mapping[str, Any], source: str) -> None:
    learner.model.check_delta_metadata(metadata.get("delta") or {}, source=source)
    if metadata.get("head") != learner.model.head:
        raise CheckpointMismatchError(
            f"{source} has head {metadata.get('head')!r}, this model's head is {learner.model.head!r}"
        )
    if metadata.get("config") != learner.config.to_dict():
        raise CheckpointMismatchError(
            f"{source} was saved by a learner with settings {metadata.get('config')}, this one has "
            f"{learner.config.to_dict()}; use Learner.restore to rebuild it from the checkpoint"
        )
    theirs = (metadata.get("optimizer") or {}).get("config") or {}
    if theirs.get("kind") != learner.optimizer_config.kind:
        raise CheckpointMismatchError(
            f"{source} was trained with optimizer {theirs}, this learner uses "
            f"{learner.optimizer_config.to_dict()}; create the learner with the same optimizer kind"
        )
    for part, own in (
        ("buffer", learner.buffer),
        ("regularizer", learner.regularizer),
        ("drift", learner.drift),
    ):
        if (metadata.get(part) is None) != (own is None):
            has = "has" if metadata.get(part) is not None else "has no"
            raise CheckpointMismatchError(
                f"{source} {has} {part} state but this learner {'has none' if own is None else 'has one'}; "
                f"use Learner.restore to rebuild the learner from the checkpoint"
            )


def _check_delta(learner: Learner, delta: Mapping[str, Tensor], num_classes: int, source: str) -> None:
    """Check the saved trainable tensors against the learner's, allowing a head grown to ``num_classes``."""
    own = learner.model.trainable_tensors()
    unknown, missing = sorted(set(delta) - set(own)), sorted(set(own) - set(delta))
    if unknown or missing:
        raise CheckpointMismatchError(
            f"{source} has trainable tensors that do not match this learner's model: unexpected "
            f"{unknown[:5]}, missing {missing[:5]}; load it into a learner built from the same model and "
            f"scheme"
        )
    grows = num_classes > learner.num_classes
    for name, value in delta.items():
        mine = tuple(own[name].shape)
        theirs = tuple(value.shape)
        grown_head = grows and mine and theirs[1:] == mine[1:] and mine[0] == learner.num_classes
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


def _apply(learner: Learner, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any], source: str) -> None:
    """Validate the whole state against ``learner`` first, then copy it in; a failure changes nothing."""
    from ondevice.continual.learner import LearnerState

    _check_setup(learner, metadata, source)
    num_classes = int(metadata.get("num_classes", learner.num_classes))
    if num_classes < learner.num_classes:
        raise CheckpointMismatchError(
            f"{source} has a head of {num_classes} classes but this learner's has {learner.num_classes}; "
            f"load it into a learner built from the same prepared model, before it grew"
        )
    delta = _strip(tensors, "delta/")
    _check_delta(learner, delta, num_classes, source)
    # Optimizer state by tensor name (names survive a grown head), shapes against the saved tensors.
    optim_meta = metadata.get("optimizer") or {}
    slots_by_name: dict[str, dict[str, Any]] = {}
    for key, value in _strip(tensors, "optim/").items():
        name, _, slot = key.rpartition("/")
        if name not in learner._params or name not in delta:
            raise CheckpointMismatchError(f"{source} has optimizer state for unknown tensor {name!r}")
        if value.numel() > 1 and tuple(value.shape) != tuple(delta[name].shape):
            raise CheckpointMismatchError(
                f"{source} has optimizer state {slot!r} of shape {tuple(value.shape)} for {name!r}, whose "
                f"shape is {tuple(delta[name].shape)}"
            )
        slots_by_name.setdefault(name, {})[slot] = value.clone()
    for name, slots in (optim_meta.get("scalars") or {}).items():
        if name not in learner._params or not isinstance(slots, dict):
            raise CheckpointMismatchError(f"{source} has optimizer state for unknown tensor {name!r}")
        slots_by_name.setdefault(name, {}).update(slots)
    try:
        lr = float(optim_meta.get("lr", learner.optimizer_config.lr))
        fields = LearnerState.__dataclass_fields__
        state = LearnerState(**{k: v for k, v in (metadata.get("state") or {}).items() if k in fields})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source} has malformed learner counters: {exc}") from None
    drift = None
    if learner.drift is not None:
        drift = detector_from_dict(metadata["drift"])
        if type(drift) is not type(learner.drift):
            raise CheckpointMismatchError(
                f"{source} has a {drift.kind} drift detector, this learner a {learner.drift.kind}"
            )
    # Buffer and regulariser load into shallow copies (their load_state rebinds attributes, never writes
    # into the live ones), so a refusal leaves the learner's own untouched.
    trial_buffer = copy.copy(learner.buffer) if learner.buffer is not None else None
    if trial_buffer is not None:
        trial_buffer.load_state(_strip(tensors, "buffer/"), metadata["buffer"])
    trial_reg = copy.copy(learner.regularizer) if learner.regularizer is not None else None
    if trial_reg is not None:
        trial_reg.load_state(_strip(tensors, "reg/"), metadata["regularizer"])
    # Everything is valid: copy it in.
    if num_classes > learner.num_classes:
        learner.grow_head(num_classes)
    learner.model.load_trainable(delta)
    learner.optimizer.state.clear()
    for name, slots in slots_by_name.items():
        learner.optimizer.state[learner._params[name]] = slots
    for group in learner.optimizer.param_groups:
        group["lr"] = lr
    if trial_buffer is not None and learner.buffer is not None:
        vars(learner.buffer).update(vars(trial_buffer))
    if trial_reg is not None and learner.regularizer is not None:
        vars(learner.regularizer).update(vars(trial_reg))
    if drift is not None:
        learner.drift = drift
    learner.state = state
    learner.optimizer.zero_grad(set_to_none=True)


def load_learner(
    learner: Learner, path: str | os.PathLike[str], *, kind: str = KIND_LEARNER
) -> dict[str, Any]:
    """Load ``path`` into ``learner`` after validating it; returns the checkpoint's ``extra`` dict.

    A file that fails validation leaves ``learner`` as it was.
    """
    tensors, metadata = read_learner_state(path, kind=kind)
    _apply(learner, tensors, metadata, f"checkpoint {str(path)!r}")
    return dict(metadata.get("extra") or {})


def restore_learner(
    path: str | os.PathLike[str],
    model: PreparedModel,
    *,
    on_drift: Sequence[DriftHook] = (),
    kind: str = KIND_LEARNER,
) -> Learner:
    """Rebuild a :class:`Learner` for ``model`` from a checkpoint (settings and state)."""
    from ondevice.continual.learner import Learner, LearnerConfig

    tensors, metadata = read_learner_state(path, kind=kind)
    source = f"checkpoint {str(path)!r}"
    model.check_delta_metadata(metadata.get("delta") or {}, source=source)
    try:
        config = LearnerConfig(**(metadata.get("config") or {}))
        optimizer = resolve_optimizer((metadata.get("optimizer") or {}).get("config") or {})
        buffer = buffer_from_config(metadata["buffer"]["config"]) if metadata.get("buffer") else None
        regularizer = regularizer_from_dict(metadata["regularizer"]) if metadata.get("regularizer") else None
        drift = detector_from_dict(metadata["drift"]) if metadata.get("drift") else None
    except (TypeError, KeyError) as exc:
        raise CheckpointError(f"{source} has malformed learner settings: {exc}") from None
    learner = Learner(
        model,
        optimizer=optimizer,
        buffer=buffer,
        regularizer=regularizer,
        drift=drift,
        on_drift=on_drift,
        config=config,
    )
    _apply(learner, tensors, metadata, source)
    return learner
