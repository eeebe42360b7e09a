"""Tests of the model zoo: registry, shapes, the paper's MobileNetV2, heads, blocks and layer rules."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from ondevice.errors import ConfigError, InputShapeError, UnknownModelError
from ondevice.models import (
    ClassifierModel,
    ConvBNAct,
    ConvBNAct1d,
    InvertedResidual,
    block_types,
    create_model,
    list_models,
    make_divisible,
    register_block,
    register_model,
)

ALLOWED_LEAVES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Sigmoid,
    nn.Dropout,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AvgPool2d,
    nn.Flatten,
    nn.Identity,
)

# (name, kwargs, per-sample input shape, expected feature_dim)
CASES = [
    ("mobilenetv2", {"width_mult": 0.35, "resolution": 32, "num_classes": 5}, (3, 32, 32), 1280),
    (
        "mobilenetv2",
        {"width_mult": 0.5, "resolution": 48, "num_classes": 3, "in_channels": 1},
        (1, 48, 48),
        1280,
    ),
    ("mobilenetv2", {"width_mult": 1.4, "resolution": 32, "num_classes": 2}, (3, 32, 32), 1792),
    ("mcunet", {"resolution": 32, "num_classes": 5}, (3, 32, 32), 160),
    ("mcunet", {"width_mult": 0.5, "resolution": 48, "num_classes": 4}, (3, 48, 48), 80),
    ("cnn", {}, (1, 8, 8), 128),
    ("cnn", {"resolution": 16, "in_channels": 3, "channels": (8, 16), "num_classes": 4}, (3, 16, 16), 16),
    ("cnn", {"resolution": 32, "num_classes": 7}, (1, 32, 32), 128),
    ("cnn1d", {}, (1, 64), 128),
    ("cnn1d", {"in_channels": 3, "length": 100, "channels": (8, 16, 32, 64), "num_classes": 6}, (3, 100), 64),
    ("vit", {}, (1, 16, 16), 64),
    (
        "vit",
        {"image_size": 32, "patch_size": 8, "dim": 48, "depth": 2, "heads": 3, "in_channels": 3},
        (3, 32, 32),
        48,
    ),
]


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models_has_the_zoo() -> None:
    assert list_models() == ["cnn", "cnn1d", "mcunet", "mobilenetv2", "vit"]


@pytest.mark.parametrize(("name", "kwargs", "shape", "feature_dim"), CASES)
def test_shapes(name: str, kwargs: dict, shape: tuple[int, ...], feature_dim: int) -> None:
    model = create_model(name, **kwargs)
    assert isinstance(model, ClassifierModel)
    assert model.input_shape == shape
    assert model.feature_dim == feature_dim
    assert model.model_name == name and model.model_kwargs == kwargs
    num_classes = kwargs.get("num_classes", 1000 if name in ("mobilenetv2", "mcunet") else 10)
    assert model.num_classes == num_classes
    assert isinstance(model.classifier, nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (feature_dim, num_classes)
    x = torch.randn(2, *shape)
    feats = model.features(x)
    assert feats.shape == (2, feature_dim)
    logits = model(x)
    assert logits.shape == (2, num_classes)
    torch.testing.assert_close(logits, model.classifier(feats))
    logits.sum().backward()  # trainable end to end
    assert all(p.grad is not None for p in model.parameters())


def test_mobilenetv2_matches_the_paper_and_torchvision() -> None:
    model = create_model("mobilenetv2")  # width 1.0, 224 px, 1000 classes
    assert _num_params(model) == 3_504_872  # torchvision.models.mobilenet_v2()
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17
    assert sum(b.use_residual for b in blocks) == 10
    assert [b.out_channels for b in blocks] == [
        16,
        24,
        24,
        32,
        32,
        32,
        64,
        64,
        64,
        64,
        96,
        96,
        96,
        160,
        160,
        160,
        320,
    ]
    assert [b.stride for b in blocks if b.stride == 2] == [2, 2, 2, 2]
    assert all(isinstance(m, nn.ReLU6) for m in model.modules() if isinstance(m, nn.ReLU | nn.ReLU6))
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (32 * 0.35, 16),
        (16 * 0.35, 8),
        (24 * 0.35, 8),
        (64 * 0.35, 24),
        (320 * 0.35, 112),
        (1280, 1280),
        (19, 24),
    ],
)
def test_make_divisible(value: float, expected: int) -> None:
    assert make_divisible(value, 8) == expected


def test_mobilenetv2_width_035_channels() -> None:
    model = create_model("mobilenetv2", width_mult=0.35, resolution=32)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert model.features[0][0].out_channels == 16
    assert [b.out_channels for b in blocks][::3] == [8, 16, 24, 24, 32, 56]
    assert blocks[-1].out_channels == 112


def test_mcunet_has_per_block_kernels_and_expand_ratios() -> None:
    model = create_model("mcunet", resolution=32)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert {b.kernel_size for b in blocks} == {3, 5, 7}
    assert len({b.expand_ratio for b in blocks}) >= 4
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert sorted({m.kernel_size[0] for m in depthwise}) == [3, 5, 7]


@pytest.mark.parametrize(("name", "kwargs", "shape", "feature_dim"), CASES)
def test_layer_rules(name: str, kwargs: dict, shape: tuple[int, ...], feature_dim: int) -> None:
    model = create_model(name, **kwargs)
    modules = dict(model.named_modules())
    for qualname, module in modules.items():
        if len(list(module.children())) == 0:
            assert isinstance(module, ALLOWED_LEAVES), f"{qualname} is a {type(module).__name__}"
        assert not getattr(module, "inplace", False), f"{qualname} is inplace"
        if isinstance(module, nn.Linear):
            assert module.bias is not None, f"{qualname} lacks a bias"
    # Every conv followed by a norm has no bias.
    leaves = [(n, m) for n, m in modules.items() if len(list(m.children())) == 0]
    for (qualname, module), (_, nxt) in itertools.pairwise(leaves):
        if isinstance(module, nn.Conv1d | nn.Conv2d) and isinstance(nxt, nn.BatchNorm1d | nn.BatchNorm2d):
            assert module.bias is None, f"{qualname} has a bias before a norm"


def test_block_registry() -> None:
    types = block_types()
    assert {InvertedResidual, ConvBNAct, ConvBNAct1d} <= set(types)
    with pytest.raises(ConfigError, match="already registered"):
        register_block(InvertedResidual)
    for name, kwargs, _, _ in CASES:
        model = create_model(name, **kwargs)
        blocks = [m for m in model.modules() if isinstance(m, types)]
        if name == "vit":
            assert blocks == []  # transformer blocks are not conv blocks
            continue
        assert blocks
        for block in blocks:
            for attr in ("in_channels", "out_channels", "stride"):
                assert type(getattr(block, attr)) is int
            # registered blocks never nest
            assert not any(isinstance(m, types) for m in list(block.modules())[1:])


def test_inverted_residual_adds_input_only_when_shapes_match() -> None:
    block = InvertedResidual(16, 16, 1, 6).eval()
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(block(x), x + block.conv(x))
    strided = InvertedResidual(16, 16, 2, 6).eval()
    assert not strided.use_residual and strided(x).shape == (2, 16, 4, 4)
    assert not InvertedResidual(16, 24, 1, 6).use_residual


@pytest.mark.parametrize(("name", "kwargs", "shape", "feature_dim"), CASES[::2])
def test_grow_head_keeps_old_logits_exactly(name: str, kwargs: dict, shape: tuple, feature_dim: int) -> None:
    model = create_model(name, **kwargs).eval()
    old_classes = model.num_classes
    x = torch.randn(3, *shape)
    before = model(x)
    old_weight = model.classifier.weight.detach().clone()
    old_bias = model.classifier.bias.detach().clone()
    head = model.grow_head(old_classes + 4)
    after = model(x)
    assert head is model.classifier and isinstance(head, nn.Linear)
    assert model.num_classes == old_classes + 4 and after.shape == (3, old_classes + 4)
    # The old rows are copied bit for bit; the logits agree to float rounding (a wider GEMM may block
    # its sums differently).
    torch.testing.assert_close(after[:, :old_classes], before, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.classifier.bias[:old_classes], old_bias)
    assert torch.equal(model.classifier.weight[:old_classes], old_weight)
    assert model.classifier.weight[old_classes:].abs().sum() > 0  # new rows are initialised, not empty
    assert model.grow_head(old_classes + 4) is head  # same size: unchanged
    with pytest.raises(ConfigError, match="cannot shrink"):
        model.grow_head(old_classes)


def test_replace_head_is_fresh() -> None:
    model = create_model("cnn", num_classes=5)
    old = model.classifier
    head = model.replace_head(3)
    assert head is model.classifier and head is not old
    assert (head.in_features, head.out_features) == (128, 3) and model.num_classes == 3
    assert torch.count_nonzero(head.bias) == 0
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize("name", ["mobilenetv2", "mcunet", "cnn", "cnn1d", "vit"])
def test_init_is_deterministic_given_seed(name: str) -> None:
    kwargs = {"resolution": 32} if name in ("mobilenetv2", "mcunet") else {}
    torch.manual_seed(3)
    a = create_model(name, **kwargs).state_dict()
    torch.manual_seed(3)
    b = create_model(name, **kwargs).state_dict()
    torch.manual_seed(4)
    c = create_model(name, **kwargs).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(UnknownModelError, match=r"'cnn', 'cnn1d', 'mcunet', 'mobilenetv2', 'vit'"):
        create_model("resnet50")
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):  # also a ValueError
        create_model("resnet50")


@pytest.mark.parametrize(
    ("name", "kwargs", "field"),
    [
        ("cnn", {"widht": 2}, "widht"),
        ("mobilenetv2", {"width_mult": 0}, "width_mult"),
        ("mobilenetv2", {"resolution": -1}, "resolution"),
        ("mcunet", {"num_classes": 0}, "num_classes"),
        ("cnn", {"channels": ()}, "channels"),
        ("cnn1d", {"kernel_size": 4}, "kernel_size"),
        ("vit", {"dim": 30, "heads": 4}, "heads"),
        ("vit", {"image_size": 18, "patch_size": 4}, "patch_size"),
        ("vit", {"dropout": 1.5}, "dropout"),
    ],
)
def test_bad_kwargs_name_the_field(name: str, kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        create_model(name, **kwargs)


def test_duplicate_registration_is_an_error() -> None:
    with pytest.raises(ConfigError, match="already registered"):

        @register_model("cnn")
        def another_cnn() -> ClassifierModel:  # pragma: no cover - never called
            raise AssertionError


@pytest.mark.parametrize(
    ("name", "kwargs", "bad_shape"),
    [("cnn", {}, (2, 3, 8, 8)), ("cnn", {}, (1, 8, 8)), ("cnn1d", {}, (2, 64)), ("vit", {}, (2, 1, 32, 32))],
)
def test_wrong_input_shape_raises(name: str, kwargs: dict, bad_shape: tuple) -> None:
    model = create_model(name, **kwargs)
    with pytest.raises(InputShapeError, match="expects"):
        model(torch.randn(*bad_shape))


def test_meta_tensors_flow_through_every_model() -> None:
    for name, kwargs, shape, _ in CASES[::3]:
        with torch.device("meta"):
            model = create_model(name, **kwargs)
            out = model(torch.empty(4, *shape))
        assert out.shape == (4, model.num_classes) and out.device.type == "meta"
