"""Backbone checkpoints (``ondevice.backbone``): the frozen tensors as held, int8 + scales or float.

A backbone saved from one prepared model and loaded, with its delta, into the same architecture built with
other random weights must give bit-identical outputs and gradients; sizes are the real file sizes; every
refusal leaves the model exactly as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ondevice import CheckpointError, CheckpointMismatchError, PreparedModel, prepare
from ondevice.backbone import (
    BACKBONE_FORMAT,
    backbone_digest,
    backbone_metadata,
    backbone_tensors,
    load_backbone,
    save_backbone,
)
from ondevice.checkpoint import KIND_BACKBONE, KIND_DELTA, read_tensors, write_tensors
from ondevice.models import create_model

ZOO = {
    "mobilenetv2": {"width_mult": 0.35, "resolution": 32, "num_classes": 10},
    "cnn": {"num_classes": 10},
    "vit": {"num_classes": 10},
}
SPARSE = {"name": "sparse", "bias_last_k": 2, "weight_layers": [1, -1], "channel_ratios": [0.5, 1.0]}
CASES = [("mobilenetv2", "bias"), ("mobilenetv2", "lite_residual"), ("cnn", SPARSE), ("vit", "lora")]
IDS = ["mobilenetv2-bias", "mobilenetv2-lite_residual", "cnn-sparse", "vit-lora"]


def _prepared(name: str, scheme: object, frozen_weights: str, *, seed: int = 0) -> PreparedModel:
    torch.manual_seed(seed)
    return prepare(create_model(name, **ZOO[name]), scheme, frozen_weights=frozen_weights)  # type: ignore[arg-type]


def _snapshot(model: PreparedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def _unchanged(model: PreparedModel, before: dict[str, torch.Tensor]) -> bool:
    after = model.model.state_dict()
    return sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


def _step(
    model: PreparedModel, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out, y).backward()
    grads = {k: p.grad.clone() for k, p in model.trainable_parameters().items() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("frozen_weights", ["int8", "float"])
@pytest.mark.parametrize(("name", "scheme"), CASES, ids=IDS)
def test_a_fresh_model_with_the_backbone_and_delta_is_the_original(
    tmp_path: Path, name: str, scheme: object, frozen_weights: str
) -> None:
    original = _prepared(name, scheme, frozen_weights, seed=0)
    with torch.no_grad():  # a trained delta, so the trainable tensors differ from a fresh model's
        for p in original.trainable_parameters().values():
            p.add_(0.01 * torch.randn_like(p))
    save_backbone(original, tmp_path / "backbone.safetensors")
    original.save_delta(tmp_path / "delta.safetensors")

    fresh = _prepared(name, scheme, frozen_weights, seed=1)  # other random weights, same architecture
    assert backbone_digest(fresh) != backbone_digest(original)
    metadata = fresh.load_backbone(tmp_path / "backbone.safetensors")
    fresh.load_delta(tmp_path / "delta.safetensors")

    assert metadata["frozen_weights"] == frozen_weights and metadata["format"] == BACKBONE_FORMAT
    assert metadata["backbone_sha256"] == backbone_digest(original) == backbone_digest(fresh)
    assert _unchanged(fresh, _snapshot(original))  # every tensor, bit for bit
    generator = torch.Generator().manual_seed(3)
    input_shape: tuple[int, ...] = original.model.input_shape  # type: ignore[assignment]  # zoo models
    x = torch.randn(4, *input_shape, generator=generator)
    y = torch.randint(0, 10, (4,), generator=generator)
    (out_a, grads_a), (out_b, grads_b) = _step(original, x, y), _step(fresh, x, y)
    assert torch.equal(out_a, out_b)
    assert grads_a and sorted(grads_a) == sorted(grads_b)
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


def test_an_int8_backbone_holds_int8_weights_and_scales_and_no_float_copy(tmp_path: Path) -> None:
    prepared = _prepared("mobilenetv2", "bias", "int8")
    tensors, metadata = read_tensors(save_backbone(prepared, tmp_path / "b.safetensors"), kind=KIND_BACKBONE)
    assert metadata["int8_layers"] == sorted(prepared.int8_layers) and metadata["kind"] == KIND_BACKBONE
    assert metadata["model_fingerprint"] == prepared.fingerprint
    assert metadata["model_class"] == type(prepared.model).__qualname__
    assert metadata["scheme"] == prepared.scheme.to_dict() and metadata["ondevice_version"]
    for layer in prepared.int8_layers:
        assert tensors[f"{layer}.weight_int8"].dtype == torch.int8
        assert tensors[f"{layer}.weight_scale"].dtype == torch.float32
        assert f"{layer}.weight" not in tensors
    trainable = set(prepared.trainable_tensors())
    assert not trainable & set(tensors)  # only what does not train
    assert set(tensors) | trainable == set(prepared.model.state_dict())


def test_the_int8_file_is_about_a_quarter_of_the_float_one(tmp_path: Path) -> None:
    """MobileNetV2 (width 1.0): int8 weights + one float32 scale per output channel, real file sizes."""
    sizes: dict[str, int] = {}
    for frozen_weights in ("float", "int8"):
        torch.manual_seed(0)
        model = create_model("mobilenetv2", width_mult=1.0, resolution=32, num_classes=10)
        prepared = prepare(model, "bias", frozen_weights=frozen_weights)  # type: ignore[arg-type]
        path = save_backbone(prepared, tmp_path / f"{frozen_weights}.safetensors")
        sizes[frozen_weights] = os.path.getsize(path)
        payload = sum(t.numel() * t.element_size() for t in backbone_tensors(prepared).values())
        header = int.from_bytes(path.read_bytes()[:8], "little")
        assert sizes[frozen_weights] == 8 + header + payload  # the tensors as held, nothing else
        if frozen_weights == "int8":
            int8 = sum(prepared.model.get_parameter(f"{n}.weight_int8").numel() for n in prepared.int8_layers)
            floats = sum(
                t.numel() * t.element_size()
                for t in backbone_tensors(prepared).values()
                if t.dtype != torch.int8
            )
            assert payload == int8 + floats
    ratio = sizes["int8"] / sizes["float"]
    assert 0.25 < ratio < 0.29, sizes


def test_flipped_bytes_are_refused_and_the_model_is_unchanged(tmp_path: Path) -> None:
    source = _prepared("cnn", "bias", "int8", seed=0)
    path = save_backbone(source, tmp_path / "b.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # a byte of the last tensor
    path.write_bytes(bytes(data))
    target = _prepared("cnn", "bias", "int8", seed=1)
    before = _snapshot(target)
    with pytest.raises(CheckpointError, match=r"damaged.*digest"):
        target.load_backbone(path)
    assert _unchanged(target, before)


@pytest.mark.parametrize(("saved", "loading"), [("int8", "float"), ("float", "int8")])
def test_a_frozen_weights_mismatch_says_what_it_found_and_how_to_fix_it(
    tmp_path: Path, saved: str, loading: str
) -> None:
    path = save_backbone(_prepared("cnn", "bias", saved), tmp_path / "b.safetensors")
    target = _prepared("cnn", "bias", loading, seed=1)
    before = _snapshot(target)
    with pytest.raises(
        CheckpointMismatchError,
        match=rf"holds '{saved}' frozen weights, but this model holds them as '{loading}'; prepare the "
        rf"model with frozen_weights='{saved}'",
    ):
        load_backbone(target, path)
    assert _unchanged(target, before)


def test_another_model_or_scheme_is_refused(tmp_path: Path) -> None:
    path = save_backbone(_prepared("cnn", "bias", "float"), tmp_path / "b.safetensors")
    wider = prepare(create_model("cnn", num_classes=10, channels=(16, 32, 64)), "bias")
    with pytest.raises(CheckpointMismatchError, match="belongs to another model"):
        wider.load_backbone(path)
    other_scheme = _prepared("cnn", "lite_residual", "float", seed=1)
    before = _snapshot(other_scheme)
    with pytest.raises(
        CheckpointMismatchError, match=r"saved under scheme .*bias.*prepare it with the backbone"
    ):
        other_scheme.load_backbone(path)
    assert _unchanged(other_scheme, before)
    int8 = save_backbone(_prepared("cnn", "bias", "int8"), tmp_path / "int8.safetensors")
    with pytest.raises(
        CheckpointMismatchError, match=r"other layers in int8 than this model: only in the file \['features"
    ):
        _prepared("cnn", SPARSE, "int8", seed=1).load_backbone(int8)  # its trained weights stay float


def _forged(prepared: PreparedModel, path: Path, change: str) -> Path:
    """A well-formed backbone file (valid digest) whose tensors do not fit ``prepared``."""
    tensors = {k: v.clone() for k, v in backbone_tensors(prepared).items()}
    name = next(k for k in tensors if k.endswith("weight_int8"))
    if change == "dtype":
        tensors[name] = tensors[name].float()  # the dequantised values, but not int8
    elif change == "shape":
        tensors[name] = tensors[name][:1]
    elif change == "nan":
        scale = name.replace("weight_int8", "weight_scale")
        tensors[scale] = torch.full_like(tensors[scale], float("nan"))
    elif change == "missing":
        del tensors[name]
    return write_tensors(path, tensors, backbone_metadata(prepared), kind=KIND_BACKBONE)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("dtype", r"dtype torch.float32, the model holds torch.int8"),
        ("shape", r"has shape \(1, .*the model expects"),
        ("nan", "NaN or Inf"),
        ("missing", r"missing \['.*weight_int8'\]"),
    ],
)
def test_tensors_that_do_not_fit_exactly_are_refused(tmp_path: Path, change: str, match: str) -> None:
    path = _forged(_prepared("cnn", "bias", "int8"), tmp_path / "b.safetensors", change)
    target = _prepared("cnn", "bias", "int8", seed=1)
    before = _snapshot(target)
    with pytest.raises(CheckpointMismatchError, match=match):
        target.load_backbone(path)
    assert _unchanged(target, before)


def test_other_kinds_and_paths_are_refused_and_left_unchanged(tmp_path: Path) -> None:
    prepared = _prepared("cnn", "bias", "int8")
    delta = prepared.save_delta(tmp_path / "delta.safetensors")
    with pytest.raises(CheckpointError, match="is a delta checkpoint, expected backbone"):
        prepared.load_backbone(delta)
    with pytest.raises(CheckpointError, match="not a backbone checkpoint"):
        prepared.save_backbone(delta)  # a delta is never overwritten by a backbone
    assert read_tensors(delta, kind=KIND_DELTA)[1]["kind"] == KIND_DELTA
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(CheckpointError, match="not an ondevice checkpoint"):
        prepared.save_backbone(notes)
    assert notes.read_text() == "keep me"
    with pytest.raises(CheckpointError, match="is a directory"):
        prepared.save_backbone(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        prepared.load_backbone(tmp_path / "missing.safetensors")
    first = prepared.save_backbone(tmp_path / "b.safetensors")
    again = prepared.save_backbone(first)  # a backbone replaces a backbone
    assert read_tensors(again, kind=KIND_BACKBONE)[1]["backbone_sha256"] == backbone_digest(prepared)


def test_loading_keeps_the_device_and_copies_into_the_live_tensors(tmp_path: Path) -> None:
    source = _prepared("cnn", "bias", "int8")
    path = save_backbone(source, tmp_path / "b.safetensors")
    target = _prepared("cnn", "bias", "int8", seed=1)
    live = {k: v.data_ptr() for k, v in backbone_tensors(target).items()}
    target.load_backbone(path)
    assert {k: v.data_ptr() for k, v in backbone_tensors(target).items()} == live  # in place
    layer = target.model.get_submodule(target.int8_layers[0])
    assert isinstance(layer.weight_int8, nn.Parameter) and not layer.weight_int8.requires_grad
