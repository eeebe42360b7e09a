"""Lite residual on the models people bring: branches placed one per residual block by structure, within
the parameter budget, exact at start, with stock PyTorch's gradients and far less activation memory."""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import memory
import ondevice
from bench.library_models import LIBRARY_MODELS, library_available, logits_of
from ondevice._example import example_spec
from ondevice.adapters import LiteResidualBlock, branch_param_count, lite_residual_plan
from ondevice.errors import ConfigError
from ondevice.prepared import find_head
from ondevice.schemes import LiteResidual, Scheme
from ondevice.schemes.base import ApplyContext, apply_scheme
from ondevice.schemes.lite_residual import plan_lite_residual, residual_blocks

pytestmark = pytest.mark.skipif(
    not all(library_available(lib) for lib in ("torchvision", "timm", "transformers")),
    reason="needs torchvision, timm and transformers (the dev extra)",
)

BATCH = 2
#: Library CNNs that prepare() accepts; the others are checked at the applicator's level below.
PREPARED = [
    "torchvision/mobilenet_v2",
    "torchvision/resnet18",
    "torchvision/mobilenet_v3_small",
    "torchvision/efficientnet_b0",
    "timm/mobilenetv2_100",
    "timm/efficientnet_b0",
    "timm/resnet18",
    "transformers/mobilenetv2",
    "transformers/resnet",
]
APPLIED = sorted(n for n, m in LIBRARY_MODELS.items() if m.kind == "cnn" and n not in PREPARED)
MOBILENETV2 = [n for n in PREPARED if LIBRARY_MODELS[n].family == "mobilenetv2"]
#: The residual block classes of each library, by name: what TinyTL would wrap (one branch per block).
BLOCK_CLASSES = {
    "InvertedResidual",  # torchvision MobileNetV2/V3, timm MobileNet/EfficientNet
    "DepthwiseSeparableConv",  # timm's first MobileNet/EfficientNet block
    "MBConv",  # torchvision EfficientNet
    "BasicBlock",  # torchvision/timm ResNet
    "ConvNeXtBlock",  # timm ConvNeXt
    "MobileNetV2InvertedResidual",
    "ResNetBasicLayer",
    "EfficientNetBlock",
    "ConvNextLayer",  # transformers
}


@functools.cache
def _built(name: str) -> nn.Module:
    return LIBRARY_MODELS[name].build(seed=0)


def original(name: str) -> nn.Module:
    """A fresh copy of the library model (built once per session)."""
    return copy.deepcopy(_built(name))


def expected_blocks(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if type(m).__name__ in BLOCK_CLASSES}


def loss_fn(output: object, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_of(output), target)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = float(want.norm())
    return float((got - want).norm()) / scale if scale > 0 else float(got.norm())


@pytest.mark.parametrize("name", PREPARED)
def test_branches_go_one_per_block_within_budget_and_start_exact(name: str) -> None:
    model = original(name)
    x = LIBRARY_MODELS[name].example(BATCH)
    with torch.no_grad():
        expected = logits_of(model(x))
    prepared = ondevice.prepare(model, "lite_residual")
    plan = lite_residual_plan(prepared.model)
    assert plan is not None
    blocks = expected_blocks(model)
    assert set(plan.targets) == blocks and len(plan.targets) == len(blocks)
    wrapped = [n for n, m in prepared.model.named_modules() if isinstance(m, LiteResidualBlock)]
    assert not any(a.startswith(b + ".") for a in wrapped for b in wrapped)  # never nested
    assert plan.branch_params == prepared.report.added_params
    assert plan.model_params == sum(p.numel() for p in model.parameters())
    assert plan.share <= 0.10  # the default is well under the 25 % cap
    with torch.no_grad():
        got = logits_of(prepared.eval()(x))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", PREPARED)
def test_gradients_equal_stock_pytorch(name: str) -> None:
    model = original(name)
    lm = LIBRARY_MODELS[name]
    x, y = lm.example(BATCH), lm.targets(BATCH)
    ours = ondevice.prepare(model, "lite_residual")
    stock = ondevice.prepare(model, "lite_residual", memory_saving=False)
    gen = torch.Generator().manual_seed(3)
    # non-zero values everywhere (the branches' zero-initialised last norm too), the same in both
    values = {
        n: p.detach() + 0.1 * torch.randn(p.shape, generator=gen)
        for n, p in ours.trainable_parameters().items()
    }
    ours.load_trainable(values, strict=False)
    stock.load_trainable(values, strict=False)
    grads = []
    for prepared in (ours, stock):
        prepared.eval()  # dropout off in both; frozen norms stay frozen either way
        loss_fn(prepared(x), y).backward()
        grads.append({n: p.grad for n, p in prepared.trainable_parameters().items()})
    got, want = grads
    assert set(got) == set(want) and any(".branch." in n for n in want)
    worst = max(want, key=lambda n: relative_error(got[n], want[n]))
    assert relative_error(got[worst], want[worst]) <= 1e-5, worst
    assert all(float(want[n].abs().sum()) > 0 for n in want if n.endswith("branch.0.weight"))


@pytest.mark.parametrize("name", MOBILENETV2)
def test_mobilenetv2_keeps_five_times_less_activation_memory_than_stock(name: str) -> None:
    model = original(name)
    lm = LIBRARY_MODELS[name]
    x, y = lm.example(BATCH), lm.targets(BATCH)
    kept = {}
    for saving in (False, True):
        prepared = ondevice.prepare(model, "lite_residual", memory_saving=saving).train()
        kept[saving] = memory.measure(prepared, x, target=y, loss_fn=loss_fn).activation_bytes
    assert kept[False] >= 5 * kept[True], kept


@pytest.mark.parametrize("name", APPLIED)
def test_other_library_cnns_get_one_branch_per_block(name: str) -> None:
    """Models prepare() may still refuse for other layers: the applicator places and sizes branches."""
    model = original(name)
    x = LIBRARY_MODELS[name].example(BATCH)
    with torch.no_grad():
        expected = logits_of(model(x))
    for param in model.parameters():
        param.requires_grad_(False)
    ctx = ApplyContext(head=find_head(model), example=example_spec(model, tuple(x.shape)))
    plan = plan_lite_residual(model, LiteResidual(), ctx)
    assert set(plan.targets) == expected_blocks(model)
    assert plan.share <= 0.10
    apply_scheme(model, LiteResidual(), ctx)
    assert lite_residual_plan(model) == dataclasses.replace(plan, expand=None)  # read back as planned
    with torch.no_grad():
        assert torch.equal(logits_of(model.eval()(x)), expected)


# -- placement rules on small models ------------------------------------------------------------------


class Block(nn.Module):
    """A user's block that states nothing about its shape: a strided 3x3 conv and a 1x1 conv."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU(), nn.Conv2d(cout, cout, 1), nn.BatchNorm2d(cout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.first = Block(16, 32, 2)
        self.second = Block(32, 64, 2)  # a sibling of the same type: blocks without a Sequential
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.second(self.first(self.stem(x))).mean((2, 3)))


def test_blocks_without_a_container_and_odd_sizes_take_their_geometry_from_the_trace() -> None:
    torch.manual_seed(0)
    model = UserNet().eval()
    x = torch.randn(2, 3, 15, 15)  # 15 -> 8 -> 4: strides 2 with padding
    with torch.no_grad():
        expected = model(x)
    assert residual_blocks(model, "head") == ["first", "second"]
    prepared = ondevice.prepare(model, "lite_residual", example_input=(1, 3, 15, 15))
    blocks = {n: m for n, m in prepared.model.named_modules() if isinstance(m, LiteResidualBlock)}
    assert list(blocks) == ["first", "second"]
    for block, (cin, cout) in zip(blocks.values(), [(16, 32), (32, 64)], strict=True):
        conv, project = block.branch[0], block.branch[3]
        assert isinstance(conv, nn.Conv2d) and isinstance(project, nn.Conv2d)
        assert (conv.in_channels, project.out_channels, conv.stride) == (cin, cout, (2, 2))
        width = conv.out_channels
        expected_params = branch_param_count(cin, cout, width=width, dims=2, kernel_size=5, groups=16)
        assert sum(p.numel() for p in block.branch.parameters()) == expected_params
    with torch.no_grad():
        assert torch.equal(prepared.eval()(x), expected)
        assert prepared(torch.randn(2, 3, 32, 32)).shape == (2, 5)  # other sizes: the branch is resized


def test_a_plain_conv_stack_gets_a_branch_per_spatial_convolution() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4),
    )
    assert residual_blocks(model, "7") == ["0", "2"]


def test_a_too_small_budget_shrinks_every_branch_then_refuses() -> None:
    model = original("torchvision/resnet18")
    ctx = ApplyContext(head="fc", example=example_spec(model, (1, 3, 64, 64)))
    default = plan_lite_residual(model, LiteResidual(), ctx)
    tight = plan_lite_residual(model, LiteResidual(max_param_share=0.01), ctx)
    assert tight.targets == default.targets
    assert tight.share <= 0.01 < default.share
    assert tight.expand is not None and tight.expand < 0.25
    assert all(a <= b for a, b in zip(tight.widths, default.widths, strict=True))
    assert all(w % 16 == 0 for w in tight.widths)  # on the groups' grid, at least the groups
    with pytest.raises(ConfigError, match=r"need at least .*raise LiteResidual\(max_param_share=\.\.\.\)"):
        plan_lite_residual(model, LiteResidual(max_param_share=0.001), ctx)


def test_a_small_model_gets_branches_narrower_than_the_groups_to_stay_within_the_cap() -> None:
    torch.manual_seed(0)
    model = ondevice.create_model("cnn", num_classes=3, channels=(8, 16, 16)).eval()  # 3.7 k parameters
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    prepared = ondevice.prepare(model, "lite_residual")
    plan = lite_residual_plan(prepared.model)
    assert plan is not None and len(plan.targets) == 3
    assert plan.share <= 0.25
    assert plan.widths[-1] < 16  # below the 16 groups: the group conv has as many groups as channels
    with torch.no_grad():
        assert torch.equal(prepared.eval()(x), expected)
    with pytest.raises(ConfigError, match=r"even one channel wide.*max_param_share=\.\.\.\) to at least"):
        ondevice.prepare(model, LiteResidual(max_param_share=0.05))


# -- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["transformers/bert", "transformers/vit", "timm/vit_tiny", "torchvision/vit"]
)
def test_models_without_convolutional_blocks_are_told_which_schemes_fit(name: str) -> None:
    model = original(name)
    ctx = ApplyContext(head=find_head(model), example=example_spec(model))
    with pytest.raises(ConfigError, match=r"'bias'.*'lora'"):
        plan_lite_residual(model, LiteResidual(), ctx)


def test_an_mlp_under_lite_residual_is_refused_by_prepare() -> None:
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.raises(ConfigError, match=r"no Conv1d/Conv2d layer.*'bias'.*'lora'"):
        ondevice.prepare(mlp, "lite_residual")


def test_bad_targets_are_named_with_blocks_that_exist() -> None:
    model = original("torchvision/mobilenet_v2")
    with pytest.raises(ConfigError, match=r"\['features\.99'\] are not modules.*'features\.1'"):
        ondevice.prepare(model, LiteResidual(targets=("features.99",)))
    with pytest.raises(ConfigError, match=r"'classifier\.1' cannot have a branch"):
        ondevice.prepare(model, LiteResidual(targets=("classifier.1",)))
    with pytest.raises(ConfigError, match="inside other targets"):
        ondevice.prepare(model, LiteResidual(targets=("features.2", "features.2.conv.0")))
    named = ondevice.prepare(model, LiteResidual(targets=("features.2", "features.5")))
    plan = lite_residual_plan(named.model)
    assert plan is not None and plan.targets == ("features.2", "features.5")


def test_tracing_needs_an_example_batch() -> None:
    model = original("torchvision/resnet18")
    with pytest.raises(ConfigError, match=r"example_input=\(1, C, H, W\)"):
        plan_lite_residual(model, LiteResidual(), ApplyContext(head="fc", example=None))


@pytest.mark.parametrize("share", [0, -0.1, 1.5, True, "0.2"])
def test_max_param_share_is_validated(share: object) -> None:
    with pytest.raises(ConfigError, match="max_param_share must be a number in"):
        LiteResidual(max_param_share=share)  # type: ignore[arg-type]


def test_the_scheme_round_trips_through_json() -> None:
    scheme = LiteResidual(max_param_share=0.1, targets=("a.b",))
    assert Scheme.from_json(scheme.to_json()) == scheme
