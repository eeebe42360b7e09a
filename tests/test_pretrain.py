"""Tests of ondevice.pretrain: caching, corruption recovery, determinism and source accuracy."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from sklearn.linear_model import LogisticRegression

from ondevice.checkpoint import KIND_PRETRAINED_BACKBONE, read_tensors
from ondevice.data import load_digits, transfer_split
from ondevice.errors import ConfigError, UnknownModelError
from ondevice.models import ClassifierModel
from ondevice.pretrain import RECIPE_VERSION, pretrain, pretrain_with_report, pretrained_path

# A deliberately tiny configuration so that cache tests train in about a second.
TINY = {"channels": (8, 16), "epochs": 2}


def _state_equal(a: ClassifierModel, b: ClassifierModel) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_second_call_loads_the_cache(tmp_path: Path) -> None:
    first = pretrain_with_report("cnn", cache_dir=tmp_path, **TINY)
    assert not first.cached and first.path.exists()
    assert first.path.parent == tmp_path / "pretrained" and first.path.name.startswith("cnn-")
    assert first.path.suffix == ".safetensors" and first.epochs == 2
    assert not list(first.path.parent.glob("*.tmp"))  # atomic write left no temp file
    second = pretrain_with_report("cnn", cache_dir=tmp_path, **TINY)
    assert second.cached and second.path == first.path
    assert _state_equal(first.model, second.model)  # bit-identical weights
    assert second.source_accuracy == first.source_accuracy
    assert not second.model.training
    model = pretrain("cnn", cache_dir=tmp_path, **TINY)
    assert isinstance(model, ClassifierModel) and _state_equal(model, first.model)


def test_cache_file_is_safetensors_with_provenance(tmp_path: Path) -> None:
    result = pretrain_with_report("cnn", cache_dir=tmp_path, seed=3, **TINY)
    with safe_open(str(result.path), framework="pt") as f:
        header = f.metadata()
        keys = set(f.keys())
    assert keys == set(result.model.state_dict())
    tensors, meta = read_tensors(result.path, kind=KIND_PRETRAINED_BACKBONE)  # digest-checked
    spec = meta["spec"]
    assert spec["model"] == "cnn" and spec["classes"] == [0, 1, 2, 3, 4]
    assert spec["seed"] == 3 and spec["epochs"] == 2 and spec["recipe_version"] == RECIPE_VERSION
    assert spec["model_kwargs"]["channels"] == [8, 16]
    assert meta["source_accuracy"] == result.source_accuracy
    assert all(torch.equal(tensors[k], v) for k, v in result.model.state_dict().items())
    raw = result.path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")  # safetensors: u64 header length, then JSON
    assert raw[8:9] == b"{" and json.loads(raw[8 : 8 + header_len])["__metadata__"] == header


def test_training_is_deterministic_and_leaves_global_rng_alone(tmp_path: Path) -> None:
    state = torch.get_rng_state()
    a = pretrain_with_report("cnn", cache_dir=tmp_path / "a", **TINY)
    assert torch.equal(torch.get_rng_state(), state)
    b = pretrain_with_report("cnn", cache_dir=tmp_path / "b", **TINY)
    assert not b.cached and _state_equal(a.model, b.model)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_tensor_byte", "empty"])
def test_corrupt_cache_is_logged_and_recomputed(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = pretrain_with_report("cnn", cache_dir=tmp_path, **TINY)
    raw = bytearray(first.path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = bytearray(b"not a safetensors file at all")
    elif damage == "flip_tensor_byte":
        raw[-5] ^= 0xFF  # inside the tensor data, past the header
    else:
        raw = bytearray()
    first.path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="ondevice.pretrain"):
        again = pretrain_with_report("cnn", cache_dir=tmp_path, **TINY)
    assert not again.cached
    assert any("retraining" in r.getMessage() for r in caplog.records)
    assert _state_equal(again.model, first.model)  # same seed, same weights
    assert pretrain_with_report("cnn", cache_dir=tmp_path, **TINY).cached  # the file was rewritten


def test_cache_key(tmp_path: Path) -> None:
    base = pretrained_path("cnn", cache_dir=tmp_path)
    assert base == pretrained_path("cnn", cache_dir=tmp_path, resolution=8)  # defaults spelled out
    assert base == pretrained_path("cnn", cache_dir=tmp_path, epochs=15)  # the recipe's default epochs
    different = [
        pretrained_path("cnn", cache_dir=tmp_path, resolution=16),
        pretrained_path("cnn", cache_dir=tmp_path, seed=1),
        pretrained_path("cnn", cache_dir=tmp_path, epochs=3),
        pretrained_path("cnn", cache_dir=tmp_path, classes=(5, 6, 7, 8, 9)),
        pretrained_path("cnn", cache_dir=tmp_path, classes=(1, 0, 2, 3, 4)),
    ]
    assert len({base, *different}) == 6


def test_cache_dir_defaults_to_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ONDEVICE_CACHE_DIR", str(tmp_path))
    assert pretrained_path("cnn").parent == tmp_path / "pretrained"
    monkeypatch.delenv("ONDEVICE_CACHE_DIR")
    assert pretrained_path("cnn").parent == Path.home() / ".cache" / "ondevice" / "pretrained"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "resnet"}, UnknownModelError, "valid models are"),
        ({"model": "cnn", "num_classes": 3}, ConfigError, "classes="),
        ({"model": "cnn", "classes": (1, 1)}, ConfigError, "distinct"),
        ({"model": "cnn", "classes": (0, 10)}, ConfigError, "0..9"),
        ({"model": "cnn", "epochs": 0}, ConfigError, "epochs"),
        ({"model": "cnn", "widht": 3}, ConfigError, "widht"),
    ],
)
def test_pretrain_rejects(tmp_path: Path, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        pretrain(cache_dir=tmp_path, **kwargs)


# Configurations whose figures are stated in the docs; cached under $ONDEVICE_CACHE_DIR (<repo>/.cache).
# (name, kwargs, minimum source accuracy, minimum linear-probe accuracy on the unseen digits 5-9). The
# probe floors sit ~8 points under the measured values (cnn 0.98, cnn1d 0.92, mobilenetv2 0.74, mcunet
# 0.68, vit 0.78): the large nets' frozen features transfer only moderately from 700 tiny images.
PRETRAINED = [
    ("cnn", {}, 0.97, 0.93),
    ("cnn", {"resolution": 16}, 0.97, 0.9),
    ("cnn1d", {}, 0.95, 0.85),
    ("mobilenetv2", {"width_mult": 0.35, "resolution": 32}, 0.95, 0.65),
    ("mcunet", {"resolution": 32}, 0.95, 0.6),
    ("vit", {}, 0.93, 0.7),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kwargs", "min_accuracy", "min_probe"), PRETRAINED)
def test_source_accuracy_and_transfer(name: str, kwargs: dict, min_accuracy: float, min_probe: float) -> None:
    result = pretrain_with_report(name, **kwargs)
    assert result.source_accuracy >= min_accuracy
    model = result.model
    # Recompute the stated accuracy on the held-out source digits (transfer_split's source_test).
    data = load_digits(**_layout(model))
    split = transfer_split(data)
    with torch.no_grad():
        acc = (model(split.source_test.x).argmax(1) == split.source_test.y).float().mean().item()
    assert acc == pytest.approx(result.source_accuracy)
    # The frozen features transfer: a linear probe on the unseen digits 5-9.
    with torch.no_grad():
        f_train, f_test = model.features(split.target_train.x), model.features(split.target_test.x)
    probe = LogisticRegression(max_iter=3000).fit(f_train.numpy(), split.target_train.y.numpy())
    assert probe.score(f_test.numpy(), split.target_test.y.numpy()) >= min_probe


def _layout(model: ClassifierModel) -> dict:
    if len(model.input_shape) == 2:
        return {"layout": "sequence", "channels": model.input_shape[0], "length": model.input_shape[1]}
    return {"channels": model.input_shape[0], "image_size": model.input_shape[1]}
