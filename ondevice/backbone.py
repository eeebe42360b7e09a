"""The frozen backbone of a prepared model on disk: the tensors as held, int8 weights with their scales.

A :class:`~ondevice.prepared.PreparedModel` is its **backbone** (everything that does not train: frozen
weights, frozen biases, norms, buffers) plus its **delta** (what trains, :meth:`~ondevice.prepared.
PreparedModel.save_delta`). :func:`save_backbone` writes the backbone exactly as the model holds it: under
``prepare(..., frozen_weights="int8")`` each frozen Conv/Linear/Embedding weight as its int8 tensor
(``<layer>.weight_int8``) and float32 scale per output channel (``<layer>.weight_scale``), so the file
is about a quarter of the float one; under ``"float"`` the float weights. The file is a safetensors
checkpoint of kind :data:`~ondevice.checkpoint.KIND_BACKBONE` with a SHA-256 digest (never pickle).

:func:`load_backbone` restores a backbone into a model prepared the same way (same architecture, scheme
and ``frozen_weights``), e.g. one built from the zoo with random weights: it checks the kind, the digest,
the format, ``frozen_weights``, the model's fingerprint, the int8 layers, and every tensor's name, shape,
dtype (int8 stays int8) and finiteness before it copies a single tensor, so a refused file leaves the model
as it was. Backbone + delta restore the whole model::

    prepared.save_backbone("backbone.safetensors")      # once
    prepared.save_delta("delta.safetensors")            # after training
    fresh = ondevice.prepare(ondevice.create_model("mobilenetv2"), "bias", frozen_weights="int8")
    fresh.load_backbone("backbone.safetensors")
    fresh.load_delta("delta.safetensors")               # now computes what `prepared` does
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ondevice._version import __version__
from ondevice.checkpoint import (
    KIND_BACKBONE,
    check_model_fingerprint,
    read_tensors,
    tensor_digest,
    write_tensors,
)
from ondevice.errors import CheckpointMismatchError
from ondevice.schemes import Scheme

__all__ = [
    "BACKBONE_FORMAT",
    "BackboneHolder",
    "backbone_digest",
    "backbone_metadata",
    "backbone_tensors",
    "check_backbone",
    "check_backbone_metadata",
    "load_backbone",
    "load_backbone_tensors",
    "save_backbone",
]

BACKBONE_FORMAT = "ondevice.backbone/1"
"""Format tag written into every backbone checkpoint."""

_SHOWN = 5  # names listed in a mismatch message


class BackboneHolder(Protocol):
    """What these functions need of a prepared model (:class:`~ondevice.prepared.PreparedModel` has it)."""

    model: nn.Module
    scheme: Scheme
    fingerprint: str
    int8_layers: tuple[str, ...]

    @property
    def frozen_weights(self) -> str: ...

    def trainable_parameters(self) -> dict[str, nn.Parameter]: ...

    def trainable_buffers(self) -> dict[str, Tensor]: ...


def _frozen(prepared: BackboneHolder) -> dict[str, Tensor]:
    """The live frozen tensors (parameters and persistent buffers that do not train), sorted by name."""
    trains = {id(t) for t in prepared.trainable_parameters().values()}
    trains.update(id(t) for t in prepared.trainable_buffers().values())
    state = prepared.model.state_dict(keep_vars=True)
    return {name: t for name, t in sorted(state.items()) if id(t) not in trains}


def backbone_tensors(prepared: BackboneHolder) -> dict[str, Tensor]:
    """The frozen tensors of ``prepared`` as held, by name (inside ``prepared.model``), sorted.

    Int8-held weights appear as ``<layer>.weight_int8`` (int8) and ``<layer>.weight_scale`` (float32);
    the rest (float weights, frozen biases, norm parameters and statistics, other buffers) as they are.
    The tensors are detached views of the live ones: clone them to keep a snapshot.
    """
    return {name: t.detach() for name, t in _frozen(prepared).items()}


def backbone_digest(prepared: BackboneHolder) -> str:
    """SHA-256 (hex) of the backbone: :func:`~ondevice.checkpoint.tensor_digest` of :func:`backbone_tensors`
    (names, dtypes, shapes and bytes; an int8 backbone and its float original differ)."""
    return tensor_digest(backbone_tensors(prepared))


def backbone_metadata(prepared: BackboneHolder) -> dict[str, Any]:
    """What a backbone checkpoint records: format, ondevice version, ``frozen_weights``, the int8 layers,
    the model's class and fingerprint, the scheme, and the digest of the tensors."""
    return {
        "format": BACKBONE_FORMAT,
        "ondevice_version": __version__,
        "frozen_weights": prepared.frozen_weights,
        "int8_layers": sorted(prepared.int8_layers),
        "model_class": type(prepared.model).__qualname__,
        "model_fingerprint": prepared.fingerprint,
        "scheme": prepared.scheme.to_dict(),
        "backbone_sha256": backbone_digest(prepared),
    }


def _listed(names: list[str]) -> str:
    if not names:
        return "none"
    return f"{names[:_SHOWN]}{'...' if len(names) > _SHOWN else ''} ({len(names)})"


def check_backbone_metadata(
    prepared: BackboneHolder, metadata: Mapping[str, Any], *, source: str = "backbone"
) -> None:
    """Raise :class:`~ondevice.errors.CheckpointMismatchError` if ``metadata`` (as written by
    :func:`save_backbone`) does not belong to a model prepared as ``prepared`` is."""
    if metadata.get("format") != BACKBONE_FORMAT:
        raise CheckpointMismatchError(
            f"{source} has format {metadata.get('format')!r}, expected {BACKBONE_FORMAT!r}; pass a file "
            f"written by ondevice.backbone.save_backbone (PreparedModel.save_backbone)"
        )
    saved = metadata.get("frozen_weights")
    if saved != prepared.frozen_weights:
        raise CheckpointMismatchError(
            f"{source} holds {saved!r} frozen weights, but this model holds them as "
            f"{prepared.frozen_weights!r}; prepare the model with frozen_weights={saved!r} to load this "
            f"backbone (or save the backbone again from a model prepared with "
            f"frozen_weights={prepared.frozen_weights!r})"
        )
    check_model_fingerprint(
        metadata, prepared.model, prepared.fingerprint, source=source,
        fix="load it into the architecture it was saved from",
    )  # fmt: skip
    theirs, ours = metadata.get("int8_layers"), sorted(prepared.int8_layers)
    if theirs != ours:
        found = set(theirs) if isinstance(theirs, list) else set()
        raise CheckpointMismatchError(
            f"{source} holds other layers in int8 than this model: only in the file "
            f"{_listed(sorted(found - set(ours)))}, only in the model {_listed(sorted(set(ours) - found))}"
            f"; prepare the model with the scheme the backbone was saved under "
            f"({metadata.get('scheme')})"
        )


def check_backbone(
    prepared: BackboneHolder,
    tensors: Mapping[str, Tensor],
    *,
    source: str = "backbone",
    scheme: object = None,
) -> None:
    """Raise :class:`~ondevice.errors.CheckpointMismatchError` unless ``tensors`` has exactly the names,
    shapes and dtypes of ``prepared``'s backbone and holds no NaN or Inf (``scheme``, the scheme the
    tensors were saved under if known, is named in the message when the names differ)."""
    own = _frozen(prepared)
    unexpected = sorted(set(tensors) - set(own))
    missing = sorted(set(own) - set(tensors))
    if unexpected or missing:
        mine = json.loads(json.dumps(prepared.scheme.to_dict()))  # as a file holds it
        hint = (
            f"it was saved under scheme {scheme}, this model is prepared with {mine}: prepare it with the "
            f"backbone's scheme"
            if scheme is not None and scheme != mine
            else "load a backbone saved from the same architecture, scheme and frozen_weights"
        )
        raise CheckpointMismatchError(
            f"{source} does not fit this model's backbone: unexpected tensors {_listed(unexpected)}, "
            f"missing {_listed(missing)}; {hint}"
        )
    for name, value in tensors.items():
        target = own[name]
        if not isinstance(value, Tensor):
            raise CheckpointMismatchError(f"{source}: {name!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointMismatchError(
                f"{source}: tensor {name!r} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(target.shape)}; load a backbone saved from the same architecture"
            )
        if value.dtype != target.dtype:
            raise CheckpointMismatchError(
                f"{source}: tensor {name!r} has dtype {value.dtype}, the model holds {target.dtype}; a "
                f"backbone loads only into a model that holds it in the same dtypes (int8 weights as int8)"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointMismatchError(f"{source}: tensor {name!r} holds NaN or Inf; refusing to load it")


def load_backbone_tensors(
    prepared: BackboneHolder, tensors: Mapping[str, Tensor], *, source: str = "backbone"
) -> None:
    """Check ``tensors`` with :func:`check_backbone`, then copy them into ``prepared``'s backbone.

    For a backbone that arrives in memory (e.g. over a network); :func:`load_backbone` reads a file.
    Nothing is copied unless every tensor fits.
    """
    check_backbone(prepared, tensors, source=source)
    _copy_into(prepared, tensors)


def _copy_into(prepared: BackboneHolder, tensors: Mapping[str, Tensor]) -> None:
    """Copy checked ``tensors`` into ``prepared``'s live frozen tensors (on their device)."""
    own = _frozen(prepared)
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value.to(own[name].device))


def save_backbone(prepared: BackboneHolder, path: str | os.PathLike[str]) -> Path:
    """Write ``prepared``'s frozen tensors as held (int8 + scales, or float) to a safetensors file.

    The file has kind :data:`~ondevice.checkpoint.KIND_BACKBONE`, a SHA-256 digest and the metadata of
    :func:`backbone_metadata`; it is written atomically (:func:`~ondevice.checkpoint.write_tensors`).

    Raises:
        CheckpointError: ``path`` is a directory, or a file that is not a backbone checkpoint (it is
            left unchanged).
    """
    return write_tensors(path, backbone_tensors(prepared), backbone_metadata(prepared), kind=KIND_BACKBONE)


def load_backbone(prepared: BackboneHolder, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a backbone written by :func:`save_backbone` into ``prepared``; returns its metadata.

    Everything is checked before a tensor is copied: kind and digest (a damaged or foreign file), format,
    ``frozen_weights`` (an int8 backbone loads only into a model prepared with ``frozen_weights="int8"``,
    and a float one only with ``"float"``), the model's fingerprint, the int8 layers, and each tensor's
    name, shape, dtype and finiteness. A refused file leaves the model as it was.

    Raises:
        CheckpointError: the file is missing, damaged, not an ondevice checkpoint or of another kind.
        CheckpointMismatchError: it belongs to another model, scheme or ``frozen_weights``.
    """
    source = f"backbone {str(path)!r}"
    tensors, metadata = read_tensors(path, kind=KIND_BACKBONE)
    check_backbone_metadata(prepared, metadata, source=source)
    check_backbone(prepared, tensors, source=source, scheme=metadata.get("scheme"))
    _copy_into(prepared, tensors)
    return metadata
