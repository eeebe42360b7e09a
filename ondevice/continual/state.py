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

What a learner holds comes from :meth:`Learner.state_dict` and goes back through
:meth:`Learner.load_state_dict` (which validates it); this module adds the format tag, reads older
formats, digests and writes. :meth:`Learner.restore` rebuilds a learner from a file.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from ondevice.checkpoint import (
    KIND_FEDERATED_DEVICE_STATE,
    KIND_LEARNER,
    read_tensors,
    tensor_digest,
    write_tensors,
)
from ondevice.continual.config import LearnerConfig
from ondevice.errors import CheckpointError

__all__ = [
    "LEARNER_FORMAT",
    "StatefulLearner",
    "load_learner",
    "read_learner_state",
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


class StatefulLearner(Protocol):
    """What saving and loading use of a learner: its state dict (a :class:`Learner` is one)."""

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]: ...

    def load_state_dict(
        self, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any], *, source: str = ...
    ) -> None: ...


def snapshot_learner(
    learner: StatefulLearner, *, extra: Mapping[str, Any] | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A detached copy of ``learner``'s state, ``(tensors, metadata)``, its digest in ``metadata["digest"]``.

    :func:`save_learner` writes one; taking it separately lets a caller record the digest first (or send
    the snapshot elsewhere).
    """
    tensors, state = learner.state_dict()
    metadata: dict[str, Any] = {"format": LEARNER_FORMAT, **state}
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
    learner: StatefulLearner,
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


def load_learner(
    learner: StatefulLearner, path: str | os.PathLike[str], *, kind: str = KIND_LEARNER
) -> dict[str, Any]:
    """Load ``path`` into ``learner`` after validating it; returns the checkpoint's ``extra`` dict.

    A file that fails validation leaves ``learner`` as it was.
    """
    tensors, metadata = read_learner_state(path, kind=kind)
    learner.load_state_dict(tensors, metadata, source=f"checkpoint {str(path)!r}")
    return dict(metadata.get("extra") or {})
