"""Checkpoints you can trust: kind and digest on every file, refusal of damaged or foreign files, failed
loads that change nothing, writes that never replace what is not a checkpoint of the same kind, and output
paths validated before any work (issue 12, item 1)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ondevice
from ondevice.checkpoint import (
    KIND_DELTA,
    KIND_LEARNER,
    KIND_PRETRAINED_BACKBONE,
    KIND_TRAINER,
    check_target,
    read_tensors,
    write_tensors,
)
from ondevice.continual import create_learner
from ondevice.data import load_digits
from ondevice.errors import CheckpointError, CheckpointMismatchError
from ondevice.prepared import PreparedModel
from ondevice.pretrain import pretrain_backbone
from ondevice.trainer import Trainer


def _model(scheme: str = "full", seed: int = 0) -> PreparedModel:
    torch.manual_seed(seed)
    return ondevice.prepare(ondevice.create_model("cnn", num_classes=10, channels=(8, 16, 32)), scheme)


def _params(model: PreparedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def _assert_same(before: dict[str, torch.Tensor], model: PreparedModel) -> None:
    after = model.model.state_dict()
    assert sorted(after) == sorted(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed by a failed load"


def _flip_payload(path: Path, count: int = 1000) -> Path:
    """Flip ``count`` bytes at the start of the tensor payload (after the safetensors header)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    assert len(data) - start >= count, "payload too small for the test"
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _trained(model: PreparedModel) -> Trainer:
    digits = load_digits()
    trainer = Trainer(model, optimizer="adam", lr=0.01, batch_size=16)
    trainer.fit((digits.x[:64], digits.y[:64]))
    return trainer


def _legacy(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> Path:
    """A file as the previous version wrote it: our metadata, but no kind and no digest."""
    save_file(tensors, str(path), metadata={"ondevice": json.dumps(metadata, sort_keys=True)})
    return path


# -- the file format ---------------------------------------------------------------------------------
def test_damaged_delta_is_refused_and_the_model_is_untouched(tmp_path: Path) -> None:
    source = _model()
    _trained(source)
    path = _flip_payload(source.save_delta(tmp_path / "delta.safetensors"))
    target = _model()
    before = _params(target)
    with pytest.raises(CheckpointError, match=r"damaged"):
        target.load_delta(path)
    _assert_same(before, target)


def test_changed_metadata_is_caught_by_the_digest(tmp_path: Path) -> None:
    path = write_tensors(tmp_path / "x.safetensors", {"a": torch.ones(4)}, {"step": 3}, kind=KIND_DELTA)
    data = path.read_bytes()
    assert data.count(b'\\"step\\": 3') == 1  # the metadata JSON sits escaped inside the header JSON
    path.write_bytes(data.replace(b'\\"step\\": 3', b'\\"step\\": 4'))
    with pytest.raises(CheckpointError, match=r"damaged"):
        read_tensors(path)


def test_wrong_kind_is_refused_with_both_kinds_named(tmp_path: Path) -> None:
    model = _model()
    trainer = _trained(model)
    path = trainer.save_checkpoint(tmp_path / "run.safetensors")
    target = _model()
    before = _params(target)
    with pytest.raises(CheckpointError, match=r"is a trainer checkpoint, expected delta"):
        target.load_delta(path)
    _assert_same(before, target)
    delta = model.save_delta(tmp_path / "delta.safetensors")
    with pytest.raises(CheckpointError, match=r"is a delta checkpoint, expected trainer"):
        Trainer(_model()).resume(delta)
    _, meta = read_tensors(path)  # kind=None accepts any kind and reports it
    assert meta["kind"] == KIND_TRAINER


def test_files_of_the_previous_version_are_refused_with_advice(tmp_path: Path) -> None:
    model = _model()
    path = _legacy(tmp_path / "old.safetensors", model.trainable_tensors(), model.delta_metadata())
    with pytest.raises(CheckpointError, match=r"earlier ondevice version.*save it again"):
        _model().load_delta(path)


def test_unknown_kind_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"unknown checkpoint kind 'weights'.*'delta'"):
        write_tensors(tmp_path / "x.safetensors", {"a": torch.ones(1)}, {}, kind="weights")
    assert not (tmp_path / "x.safetensors").exists()


# -- loads that fail change nothing ------------------------------------------------------------------
def test_damaged_trainer_checkpoint_leaves_the_trainer_untouched(tmp_path: Path) -> None:
    path = _flip_payload(_trained(_model()).save_checkpoint(tmp_path / "run.safetensors"))
    trainer = _trained(_model(seed=1))
    before = _params(trainer.model)
    steps, slots = trainer.state.optimizer_steps, len(trainer.optimizer.state)
    with pytest.raises(CheckpointError, match=r"damaged"):
        trainer.resume(path)
    _assert_same(before, trainer.model)
    assert trainer.state.optimizer_steps == steps and len(trainer.optimizer.state) == slots


def test_invalid_trainer_checkpoint_is_checked_before_the_weights_change(tmp_path: Path) -> None:
    # A well-formed file whose optimizer state names a tensor this model does not have: the old resume
    # loaded the weights first and failed afterwards, leaving a half-restored model.
    source = _model()
    tensors = {k: v + 1 for k, v in source.trainable_tensors().items()}
    tensors["optimizer/nosuch.weight/exp_avg"] = torch.zeros(3)
    metadata = source.delta_metadata()
    metadata["trainer"] = {"optimizer": {"kind": "sgd"}, "optimizer_scalars": {}, "state": {}}
    path = write_tensors(tmp_path / "run.safetensors", tensors, metadata, kind=KIND_TRAINER)
    trainer = Trainer(_model())
    before = _params(trainer.model)
    with pytest.raises(CheckpointMismatchError, match=r"unknown tensor 'nosuch.weight'"):
        trainer.resume(path)
    _assert_same(before, trainer.model)


def test_damaged_learner_checkpoint_leaves_the_learner_untouched(tmp_path: Path) -> None:
    digits = load_digits()
    saved = create_learner(_model("last_layer"), "replay", buffer_size=20)
    saved.observe(digits.x[:16], digits.y[:16])
    path = _flip_payload(saved.save(tmp_path / "learner.safetensors"), count=200)
    learner = create_learner(_model("last_layer", seed=1), "replay", buffer_size=20)
    learner.observe(digits.x[16:24], digits.y[16:24])
    before, seen = _params(learner.model), learner.samples_seen
    with pytest.raises(CheckpointError, match=r"damaged"):
        learner.load(path)
    _assert_same(before, learner.model)
    assert learner.samples_seen == seen


def test_learner_state_with_a_bad_buffer_is_refused_before_anything_changes(tmp_path: Path) -> None:
    digits = load_digits()
    saved = create_learner(_model("last_layer"), "replay", buffer_size=20)
    saved.observe(digits.x[:16], digits.y[:16])
    tensors, metadata = read_tensors(saved.save(tmp_path / "learner.safetensors"))
    del tensors["buffer/rng"]  # a valid learner state, except that its buffer lacks the generator state
    path = write_tensors(tmp_path / "bad.safetensors", tensors, metadata, kind=KIND_LEARNER)
    learner = create_learner(_model("last_layer", seed=1), "replay", buffer_size=20)
    learner.observe(digits.x[16:24], digits.y[16:24])
    before, seen = _params(learner.model), learner.samples_seen
    stored = learner.buffer.state_tensors()["values"].clone() if learner.buffer else None
    with pytest.raises(CheckpointError, match=r"generator state"):
        learner.load(path)
    _assert_same(before, learner.model)
    assert learner.samples_seen == seen
    assert learner.buffer is not None and stored is not None
    assert torch.equal(learner.buffer.state_tensors()["values"], stored)


# -- writes never replace what is not theirs ---------------------------------------------------------
def test_save_never_replaces_a_file_that_is_not_a_checkpoint_of_its_kind(tmp_path: Path) -> None:
    model = _model()
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    with pytest.raises(CheckpointError, match=r"not an ondevice checkpoint.*left unchanged"):
        model.save_delta(notes)
    assert notes.read_text() == "my notes\n"
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    original = foreign.read_bytes()
    with pytest.raises(CheckpointError, match=r"not an ondevice checkpoint"):
        model.save_delta(foreign)
    assert foreign.read_bytes() == original
    delta = model.save_delta(tmp_path / "delta.safetensors")
    original = delta.read_bytes()
    with pytest.raises(CheckpointError, match=r"is a delta checkpoint, not a trainer checkpoint"):
        Trainer(model).save_checkpoint(delta)
    assert delta.read_bytes() == original
    (tmp_path / "dir").mkdir()
    with pytest.raises(CheckpointError, match=r"is a directory"):
        model.save_delta(tmp_path / "dir")
    # The same kind is replaced (a damaged one too: saving good state over it is the repair).
    _flip_payload(delta, count=100)
    model.save_delta(delta)
    _model().load_delta(delta)


# -- output paths checked before the work --------------------------------------------------------------
def test_check_target_says_what_is_there_and_creates_nothing(tmp_path: Path) -> None:
    fresh = tmp_path / "sub" / "deeper" / "run.safetensors"
    assert check_target(fresh, kind=KIND_TRAINER) is False
    assert not (tmp_path / "sub").exists()
    model = _model()
    trainer = _trained(model)
    run = trainer.save_checkpoint(tmp_path / "run.safetensors")
    assert check_target(run, kind=KIND_TRAINER) is True
    with pytest.raises(CheckpointError, match=r"is a trainer checkpoint, expected delta.*another path"):
        check_target(run, kind=KIND_DELTA)
    with pytest.raises(CheckpointError, match=r"is a directory"):
        check_target(tmp_path, kind=KIND_TRAINER)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(CheckpointError, match=r"corrupt or not a safetensors file.*delete"):
        check_target(notes, kind=KIND_TRAINER)
    with pytest.raises(CheckpointError, match=r"not a directory"):
        check_target(notes / "run.safetensors", kind=KIND_TRAINER)
    legacy = _legacy(tmp_path / "old.safetensors", model.trainable_tensors(), model.delta_metadata())
    with pytest.raises(CheckpointError, match=r"earlier ondevice version"):
        check_target(legacy, kind=KIND_DELTA)
    damaged = _flip_payload(trainer.save_checkpoint(tmp_path / "damaged.safetensors"))
    with pytest.raises(CheckpointError, match=r"damaged.*delete"):
        check_target(damaged, kind=KIND_TRAINER)
    assert notes.read_text() == "hello"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_target_refuses_a_folder_it_cannot_write(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match=r"no permission"):
            check_target(locked / "run.safetensors", kind=KIND_TRAINER)
    finally:
        locked.chmod(0o700)


# -- the pretraining cache -----------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flip", "text", "legacy"])
def test_unusable_backbone_cache_entry_is_a_miss_that_is_rewritten(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    digits = load_digits()
    from ondevice.data import TensorData

    data = TensorData(digits.x[:96], digits.y[:96] % 2)
    first = pretrain_backbone("cnn", data, epochs=1, cache_dir=tmp_path, channels=(4, 8, 16))
    (entry,) = (tmp_path / "pretrained").glob("*.safetensors")
    if damage == "flip":
        _flip_payload(entry)
    elif damage == "text":
        entry.write_text("not a checkpoint")
    else:
        _legacy(entry, dict(first.state_dict()), {"spec": {}})
    with caplog.at_level(logging.WARNING, logger="ondevice.continual.scenarios"):
        again = pretrain_backbone("cnn", data, epochs=1, cache_dir=tmp_path, channels=(4, 8, 16))
    assert "unusable, retraining" in caplog.text
    for name, value in first.state_dict().items():
        assert torch.equal(again.state_dict()[name], value)  # retrained from the same seed
    tensors, meta = read_tensors(entry, kind=KIND_PRETRAINED_BACKBONE)  # rewritten, valid
    assert meta["kind"] == KIND_PRETRAINED_BACKBONE and sorted(tensors) == sorted(first.state_dict())
