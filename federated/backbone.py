"""The frozen backbone, shipped once from the server to each device (``FederatedConfig.ship_backbone``).

Without shipping, every device builds the backbone itself (:func:`ondevice.pretrain`, cached) and server
and devices compare its digest. With ``ship_backbone=True`` the server sends its frozen tensors as it holds
them (:func:`ondevice.backbone.backbone_tensors`: int8 weights with their float32 scales under
``frozen_weights="int8"``, float otherwise) in the ``"backbone"`` ``ArrayRecord`` of the first train
message a device gets, and the device:

1. builds the bare architecture from the zoo (seeded; no pretraining) and prepares it as the federation
   says (:func:`federated.client.build_model` with ``pretrained=False``);
2. checks the arrays on arrival (:func:`read_backbone_record`): decoded without pickle, exactly the names,
   shapes and dtypes of its own backbone, finite, and the SHA-256 digest the server announced in the
   message's config record (``"backbone"``); a payload that fails is refused with a
   :class:`~federated.errors.PayloadError` and nothing of it is loaded or kept;
3. loads them (:func:`ondevice.backbone.load_backbone_tensors`) and keeps them in its state directory
   (``backbone.safetensors``, :func:`ondevice.backbone.save_backbone`), from where later rounds and
   restarts load them;
4. confirms the digest of the backbone it holds in the ``"device"`` ``ConfigRecord`` of every reply.

The server sends the backbone to a node until a reply confirms the server's digest (and again after a
reply that does not, e.g. an error reply of a device that lost its state).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from torch import Tensor

from federated.errors import PayloadError
from federated.records import from_record, to_numpy, to_record
from federated.validation import check_update
from ondevice.backbone import BackboneHolder, backbone_tensors
from ondevice.checkpoint import tensor_digest

__all__ = [
    "BACKBONE_FILE",
    "BACKBONE_RECORD",
    "DEVICE_RECORD",
    "backbone_record",
    "confirmed_backbone",
    "device_record",
    "read_backbone_record",
    "reported_state_note",
]

BACKBONE_RECORD = "backbone"
"""The train message's ``ArrayRecord`` that carries the frozen backbone (first message to a device only)."""
DEVICE_RECORD = "device"
"""The reply's ``ConfigRecord`` in which a device states the digest of the backbone it holds."""
BACKBONE_FILE = "backbone.safetensors"
"""Where a device keeps a shipped backbone, inside its state directory."""


def backbone_record(prepared: BackboneHolder) -> ArrayRecord:
    """The frozen tensors of ``prepared`` as held (int8 + scales, or float), sorted, as an ``ArrayRecord``."""
    return to_record(backbone_tensors(prepared))


def read_backbone_record(record: object, prepared: BackboneHolder, *, digest: str) -> dict[str, Tensor]:
    """Decode and check a shipped backbone against ``prepared``'s own and the announced ``digest``.

    Returns the tensors, ready for :func:`ondevice.backbone.load_backbone_tensors`.

    Raises:
        PayloadError: not an ``ArrayRecord`` or not decodable without pickle; other names, shapes or dtypes
            than this device's backbone (e.g. float weights where it holds int8); NaN or Inf; or a digest
            other than the one the server announced (damaged or altered on the way).
    """
    arrays = from_record(record)
    own = to_numpy(backbone_tensors(prepared))
    spec = {name: (tuple(value.shape), value.dtype) for name, value in own.items()}
    reason = check_update(arrays, spec)
    if reason is not None:
        raise PayloadError(
            f"the shipped backbone does not fit this device's {type(prepared.model).__name__} prepared with "
            f"frozen_weights={prepared.frozen_weights!r}: {reason}; server and devices must run the same "
            f"federation configuration"
        )
    tensors = {name: torch.from_numpy(np.array(value)) for name, value in arrays.items()}
    found = tensor_digest(tensors)
    if found != digest:
        raise PayloadError(
            f"the shipped backbone's digest {found[:16]}... differs from the one the server announced "
            f"({digest[:16]}...): it was damaged or altered on the way, so it was neither loaded nor kept; "
            f"the server sends it again with its next message to this device"
        )
    return tensors


STATE_NOTE = "state"
"""The key of the reply's ``"device"`` record that says what of its saved state a device could not keep."""


def device_record(digest: str, *, state_note: str | None = None) -> ConfigRecord:
    """The reply's ``"device"`` record: the digest of the backbone the device holds and, when its saved
    state could not be (wholly) kept, why (:attr:`federated.client.DeviceLearner.state_note`)."""
    record = ConfigRecord({BACKBONE_RECORD: digest})
    if state_note:
        record[STATE_NOTE] = state_note
    return record


def reported_state_note(reply: Message) -> str | None:
    """What a reply says its device could not keep of its saved state, or None."""
    if reply.has_error() or not reply.has_content():
        return None
    record = reply.content.get(DEVICE_RECORD)
    value = record.get(STATE_NOTE) if isinstance(record, ConfigRecord) else None
    return value if isinstance(value, str) and value else None


def confirmed_backbone(reply: Message) -> str | None:
    """The backbone digest a reply confirms, or None (an error reply, or no ``"device"`` record)."""
    if reply.has_error() or not reply.has_content():
        return None
    record = reply.content.get(DEVICE_RECORD)
    if not isinstance(record, ConfigRecord):
        return None
    value = record.get(BACKBONE_RECORD)
    return value if isinstance(value, str) else None
