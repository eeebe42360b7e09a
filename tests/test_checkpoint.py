"""Tensors on disk: atomic writes, validation on read, clean-up after an interrupted write."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ondevice.checkpoint import KIND_DELTA, atomic_write_bytes, read_tensors, write_tensors
from ondevice.errors import CheckpointError


def test_round_trip_keeps_values_and_metadata(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2, 3])}
    path = write_tensors(
        tmp_path / "x.safetensors", tensors, {"scheme": {"name": "bias"}, "step": 3}, kind=KIND_DELTA
    )
    loaded, meta = read_tensors(path)
    assert meta == {"scheme": {"name": "bias"}, "step": 3, "kind": "delta"}
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_overwrite_replaces_the_whole_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    write_tensors(path, {"a": torch.zeros(1000)}, {"v": 1}, kind=KIND_DELTA)
    write_tensors(path, {"a": torch.ones(3)}, {"v": 2}, kind=KIND_DELTA)
    loaded, meta = read_tensors(path)
    assert meta == {"v": 2, "kind": "delta"} and torch.equal(loaded["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_temporaries_of_an_interrupted_write_are_removed_by_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / "state.safetensors"
    stale = tmp_path / ".state.safetensors.abc123.tmp"
    stale.write_bytes(b"half a file")
    unrelated = tmp_path / ".other.safetensors.abc123.tmp"
    unrelated.write_bytes(b"not ours")
    atomic_write_bytes(target, b"complete")
    assert target.read_bytes() == b"complete"
    assert not stale.exists() and unrelated.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "corrupt"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "corrupt"),
        (None, "not an ondevice checkpoint"),
    ],
)
def test_bad_files_raise_checkpoint_error(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    if content is None:
        save_file({"a": torch.zeros(2)}, str(path))  # a valid safetensors file without our metadata
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_tensors(path)
