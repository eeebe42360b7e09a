"""Tensors on disk: safetensors plus JSON metadata, written atomically, validated on read. Never pickle."""

from __future__ import annotations

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

from ondevice.errors import CheckpointError

__all__ = ["atomic_write_bytes", "read_tensors", "write_tensors"]

logger = logging.getLogger(__name__)

_META_KEY = "ondevice"


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


def write_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]
) -> Path:
    """Save ``tensors`` (contiguous CPU copies) and JSON ``metadata`` to a safetensors file, atomically."""
    payload = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    header = {_META_KEY: json.dumps(dict(metadata), sort_keys=True, default=str)}
    return atomic_write_bytes(path, st_save(payload, metadata=header))


def read_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load a file written by :func:`write_tensors`: ``(tensors, metadata)``.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, or not written by ondevice.
    """
    source = Path(path)
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(source)!r} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {str(source)!r} cannot be read: {exc}") from None
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        raw_meta = (header.get("__metadata__") or {}).get(_META_KEY)
        metadata = json.loads(raw_meta) if raw_meta is not None else None
    except (SafetensorError, ValueError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {str(source)!r} is corrupt or not a safetensors file ({exc}); "
            "delete it and save again"
        ) from None
    if not isinstance(metadata, dict):
        raise CheckpointError(
            f"{str(source)!r} is a safetensors file but not an ondevice checkpoint "
            f"(no '{_META_KEY}' metadata)"
        )
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            logger.warning("checkpoint %s: tensor %s holds NaN or Inf", source, name)
    return tensors, metadata
