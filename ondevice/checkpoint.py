"""Tensors on disk: safetensors plus JSON metadata, written atomically, validated on read. Never pickle.

Every file written by :func:`write_tensors` records its **kind** (what wrote it: a delta, a Trainer
checkpoint, a learner, a federated device's state, a pretrained backbone, a prepared model's frozen
backbone) and a SHA-256 **digest** over tensor names, dtypes, shapes, bytes and the metadata.
:func:`read_tensors` verifies both, so a damaged file ("damaged") or one of another kind is refused with
a :class:`~ondevice.errors.CheckpointError` before any of it reaches a model. A write never replaces a
file that is not an ondevice checkpoint of the same kind, and :func:`check_target` lets a caller validate
an output path before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from ondevice.errors import CheckpointError, CheckpointMismatchError, format_choices

__all__ = [
    "KINDS",
    "KIND_BACKBONE",
    "KIND_DELTA",
    "KIND_FEDERATED_DEVICE_STATE",
    "KIND_LEARNER",
    "KIND_PRETRAINED_BACKBONE",
    "KIND_TRAINER",
    "atomic_write_bytes",
    "check_model_fingerprint",
    "check_target",
    "payload_digest",
    "read_tensors",
    "tensor_digest",
    "write_tensors",
]

logger = logging.getLogger(__name__)

_META_KEY = "ondevice"
_DIGEST_KEY = "ondevice.sha256"
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit

KIND_DELTA = "delta"
"""A :class:`~ondevice.prepared.PreparedModel` delta (``save_delta`` / ``load_delta``)."""
KIND_TRAINER = "trainer"
"""A :class:`~ondevice.trainer.Trainer` checkpoint (delta, optimizer state, counters)."""
KIND_LEARNER = "learner"
"""A continual :class:`~ondevice.continual.learner.Learner`'s whole state."""
KIND_FEDERATED_DEVICE_STATE = "federated-device-state"
"""What a federated device keeps between rounds (its learner and top-k residuals)."""
KIND_PRETRAINED_BACKBONE = "pretrained-backbone"
"""A cached pretrained backbone (``state_dict`` of a zoo model)."""
KIND_BACKBONE = "backbone"
"""The frozen tensors of a prepared model as held, int8 or float (:func:`ondevice.backbone.save_backbone`)."""
KINDS = frozenset(
    {
        KIND_DELTA,
        KIND_TRAINER,
        KIND_LEARNER,
        KIND_FEDERATED_DEVICE_STATE,
        KIND_PRETRAINED_BACKBONE,
        KIND_BACKBONE,
    }
)
"""Every kind a checkpoint file can have."""

_HOW_TO_LOAD = {
    KIND_DELTA: "PreparedModel.load_delta",
    KIND_TRAINER: "Trainer.resume",
    KIND_LEARNER: "Learner.load or Learner.restore",
    KIND_FEDERATED_DEVICE_STATE: "a federated device's state directory",
    KIND_PRETRAINED_BACKBONE: "the pretraining cache",
    KIND_BACKBONE: "PreparedModel.load_backbone (ondevice.backbone.load_backbone)",
}


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never a mix.

    The bytes go to a temporary file in the same directory, are flushed and fsync'ed, then renamed over
    the target (``os.replace`` is atomic on POSIX and Windows); the directory is fsync'ed afterwards so
    the rename itself survives a power loss. The file gets permissions ``mode`` (temporary files are
    created private, 0600).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(target.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - directories cannot be opened on some platforms
        return target
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)
    return target


def _remove_stale_temporaries(target: Path) -> None:
    """Delete temporaries a killed writer left behind for ``target`` (their rename never happened).

    Only files of the exact ``.<name>.*.tmp`` pattern this module creates are removed. Two writers of one
    file at the same time are not supported (the later rename would win anyway).
    """
    for stale in target.parent.glob(f".{glob_escape(target.name)}.*.tmp"):
        try:
            stale.unlink()
            logger.info("removed a temporary file left by an interrupted write: %s", stale)
        except OSError:  # pragma: no cover - raced with another cleaner
            pass


def glob_escape(name: str) -> str:
    """Escape glob metacharacters in a file name."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _hash_tensors(digest: Any, tensors: Mapping[str, Tensor]) -> None:
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 (hex) over names, dtypes, shapes and bytes of ``tensors``, in sorted name order."""
    digest = hashlib.sha256()
    _hash_tensors(digest, tensors)
    return digest.hexdigest()


def check_model_fingerprint(
    metadata: Mapping[str, Any], model: object, fingerprint: str, *, source: str, fix: str
) -> None:
    """Raise :class:`~ondevice.errors.CheckpointMismatchError` unless ``metadata`` records
    ``fingerprint`` (the checkpoint belongs to ``model``'s architecture); ``fix`` ends the message."""
    if metadata.get("model_fingerprint") != fingerprint:
        raise CheckpointMismatchError(
            f"{source} belongs to another model ({metadata.get('model_class')}, fingerprint "
            f"{metadata.get('model_fingerprint')}), not this {type(model).__qualname__} "
            f"(fingerprint {fingerprint}); {fix}"
        )


def payload_digest(tensors: Mapping[str, Tensor], metadata_json: str) -> str:
    """SHA-256 (hex) of a checkpoint's payload: ``tensors`` as in :func:`tensor_digest`, then the exact
    JSON text of its metadata (so a changed counter or scheme is caught as well as a changed weight)."""
    digest = hashlib.sha256()
    _hash_tensors(digest, tensors)
    digest.update(b"|metadata|")
    digest.update(metadata_json.encode())
    return digest.hexdigest()


def _check_kind(kind: object) -> str:
    if kind not in KINDS:
        raise CheckpointError(
            f"unknown checkpoint kind {kind!r}; valid kinds are: {format_choices(KINDS)}. "
            f"Pass one of the KIND_* constants of ondevice.checkpoint"
        )
    return str(kind)


def write_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, Any],
    *,
    kind: str,
) -> Path:
    """Save ``tensors`` (contiguous CPU copies) and JSON ``metadata`` to a safetensors file, atomically.

    The file records ``kind`` (one of :data:`KINDS`, stored as ``metadata["kind"]``) and a SHA-256
    digest over the tensors and the metadata, which :func:`read_tensors` verifies. An existing file at
    ``path`` is replaced only when it is an ondevice checkpoint of the same kind (a damaged one included:
    saving good state over it is the repair).

    Raises:
        CheckpointError: ``kind`` is unknown, or ``path`` is a directory, a file that is not an ondevice
            checkpoint, or a checkpoint of another kind; the existing file is left unchanged.
    """
    _check_kind(kind)
    target = Path(path)
    _check_replaceable(target, kind)
    payload = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    meta = dict(metadata)
    meta["kind"] = kind
    meta_json = json.dumps(meta, sort_keys=True, default=str)
    header = {_META_KEY: meta_json, _DIGEST_KEY: payload_digest(payload, meta_json)}
    return atomic_write_bytes(target, st_save(payload, metadata=header))


def read_tensors(
    path: str | os.PathLike[str], *, kind: str | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load a file written by :func:`write_tensors`: ``(tensors, metadata)``, after verifying it.

    Args:
        path: the file.
        kind: the kind the caller expects (one of :data:`KINDS`); ``None`` accepts any kind.

    Returns:
        The tensors and the metadata; ``metadata["kind"]`` is the file's kind.

    Raises:
        CheckpointError: the file is missing, truncated or damaged (its digest does not match), not an
            ondevice checkpoint, of another kind than ``kind``, or written by an earlier ondevice version
            that recorded no kind and digest.
    """
    if kind is not None:
        _check_kind(kind)
    return _read(Path(path), kind, fix="")


def check_target(path: str | os.PathLike[str], *, kind: str) -> bool:
    """Validate an output path before any work starts; creates nothing.

    Returns:
        True when a valid ondevice checkpoint of ``kind`` is already there (the caller may resume from
        it), False when nothing is there yet.

    Raises:
        CheckpointError: ``path`` is a directory or another non-regular file, an existing file that is not
            an ondevice checkpoint, a checkpoint of another kind, a damaged checkpoint, or its directory
            cannot be created or written. The message says what was found and how to fix it.
    """
    _check_kind(kind)
    target = Path(path)
    fix = f"; it is left unchanged: choose another path (delete {str(target)!r} only if it may go)"
    if target.is_dir():
        raise CheckpointError(
            f"{str(target)!r} is a directory, not a checkpoint file; pass a file path such as "
            f"{str(target / 'checkpoint.safetensors')!r}"
        )
    exists = target.exists() or target.is_symlink()
    if exists and not target.is_file():
        raise CheckpointError(f"{str(target)!r} exists but is not a regular file{fix}")
    _check_directory_writable(target)
    if not exists:
        return False
    _read(target, kind, fix=fix)
    if not os.access(target, os.R_OK):  # pragma: no cover - _read would have failed already
        raise CheckpointError(f"checkpoint {str(target)!r} cannot be read{fix}")
    return True


def _check_directory_writable(target: Path) -> None:
    """The nearest existing ancestor of ``target`` is a directory we may create files in."""
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():  # a dangling link cannot hold a directory
            break
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(
            f"cannot create {str(target)!r}: {str(parent)!r} is not a directory; choose a path whose "
            f"parent folders are directories"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(
            f"cannot write {str(target)!r}: no permission to create files in {str(parent)!r}; choose a "
            f"writable location or change the folder's permissions"
        )


def _read(source: Path, kind: str | None, *, fix: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    name = f"checkpoint {str(source)!r}"
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{name} does not exist; check the path") from None
    except IsADirectoryError:
        raise CheckpointError(f"{name} is a directory, not a checkpoint file; pass the file's path") from None
    except OSError as exc:
        raise CheckpointError(f"{name} cannot be read: {exc}{fix}") from None
    header = _parse_header(data, name, fix=fix)
    found, meta_json, metadata = _identify(header, name, fix=fix)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(
            f"{name} is damaged: its tensors cannot be read ({exc}); restore a backup copy or save it "
            f"again{fix}"
        ) from None
    if payload_digest(tensors, meta_json) != header[_DIGEST_KEY]:
        raise CheckpointError(
            f"{name} is damaged: its SHA-256 digest does not match its contents (the file was corrupted "
            f"or modified after it was written); restore a backup copy or save it again{fix}"
        )
    if kind is not None and found != kind:
        raise CheckpointError(
            f"{name} is a {found} checkpoint, expected {kind}; a {found} checkpoint is loaded with "
            f"{_HOW_TO_LOAD.get(found, 'another tool')}{fix or '; pass a ' + kind + ' checkpoint'}"
        )
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            logger.warning("checkpoint %s: tensor %s holds NaN or Inf", source, key)
    return tensors, metadata


def _parse_header(data: bytes, name: str, *, fix: str) -> dict[str, Any]:
    """The ``__metadata__`` dict of a safetensors file (values are strings); raises if unreadable."""
    problem = None
    header: Any = None
    if len(data) < 8:
        problem = f"it holds {len(data)} bytes, too few for a safetensors header"
    else:
        header_len = int.from_bytes(data[:8], "little")
        if header_len > min(_MAX_HEADER_BYTES, len(data) - 8):
            problem = f"its header claims {header_len} bytes but the file holds {len(data)}"
        else:
            try:
                header = json.loads(data[8 : 8 + header_len])
            except (ValueError, UnicodeDecodeError) as exc:
                problem = f"its header is not JSON ({exc})"
    if problem is None and not isinstance(header, dict):
        problem = "its header is not a JSON object"
    if problem is not None:
        raise CheckpointError(
            f"{name} is corrupt or not a safetensors file: {problem}{fix or '; pass an ondevice checkpoint'}"
        )
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def _identify(header: Mapping[str, Any], name: str, *, fix: str) -> tuple[str, str, dict[str, Any]]:
    """``(kind, metadata JSON, metadata)`` of a parsed header; raises if it is not a current checkpoint."""
    meta_json = header.get(_META_KEY)
    metadata: Any = None
    if isinstance(meta_json, str):
        try:
            metadata = json.loads(meta_json)
        except ValueError:
            metadata = None
    if not isinstance(metadata, dict):
        raise CheckpointError(
            f"{name} is a safetensors file but not an ondevice checkpoint (no valid '{_META_KEY}' "
            f"metadata){fix or '; pass a file saved by ondevice'}"
        )
    found = metadata.get("kind")
    if found is None or _DIGEST_KEY not in header:
        raise CheckpointError(
            f"{name} was written by an earlier ondevice version that recorded no kind and digest, so its "
            f"integrity cannot be checked; load it with that version and save it again with this one"
            f"{fix or ', or delete it'}"
        )
    return str(found), str(meta_json), metadata


def _check_replaceable(target: Path, kind: str) -> None:
    """Refuse to replace anything at ``target`` but an ondevice checkpoint of ``kind`` (damaged or not)."""
    if target.is_dir():
        raise CheckpointError(
            f"cannot save to {str(target)!r}: it is a directory; pass a file path such as "
            f"{str(target / 'checkpoint.safetensors')!r}"
        )
    if not (target.exists() or target.is_symlink()):
        return
    fix = f"; it was left unchanged. Save to another path, or delete {str(target)!r} if it may be replaced"
    name = f"cannot save to {str(target)!r}: it"
    if not target.is_file():
        raise CheckpointError(f"{name} exists and is not a regular file{fix}")
    try:
        with target.open("rb") as handle:
            prefix = handle.read(8)
            header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            body = handle.read(header_len) if 0 <= header_len <= _MAX_HEADER_BYTES else b""
    except OSError as exc:
        raise CheckpointError(f"{name} cannot be read to check what it is ({exc}){fix}") from None
    if header_len < 0 or len(body) != header_len:
        raise CheckpointError(f"{name} is not an ondevice checkpoint{fix}")
    try:
        header = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{name} is not an ondevice checkpoint{fix}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    try:
        found, _, _ = _identify(meta if isinstance(meta, dict) else {}, name, fix=fix)
    except CheckpointError as exc:
        raise CheckpointError(str(exc)) from None
    if found != kind:
        raise CheckpointError(f"{name} is a {found} checkpoint, not a {kind} checkpoint{fix}")
