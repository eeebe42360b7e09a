"""prepare(..., recompute=...): blocks keep only their inputs and are recomputed in backward, exactly.

Gradients equal stock PyTorch's (``memory_saving=False, recompute=False``) at relative 1e-5 on library
transformers, a torchvision CNN and the zoo ViT; ``memory.estimate`` equals ``memory.measure`` with
recomputation; bias-only training on ViT and BERT keeps at least 3x fewer activation bytes than stock.
"""

from __future__ import annotations

import copy
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import memory
from bench.library_models import LIBRARY_MODELS, library_available, logits_of
from ondevice import ConfigError, PreparedModel, create_model, prepare
from ondevice.recompute import RecomputeConflictError, RecomputedBlock, find_blocks

needs_libraries = pytest.mark.skipif(
    not all(library_available(lib) for lib in ("transformers", "timm", "torchvision")),
    reason="the dev extra's transformers, timm and torchvision are not installed",
)

# model -> blocks recompute=True finds
LIBRARY_BLOCKS = {
    "transformers/bert": ["bert.encoder.layer.0", "bert.encoder.layer.1"],
    "transformers/vit": ["vit.layers.0", "vit.layers.1"],
    "transformers/gpt2": ["transformer.h.0", "transformer.h.1"],
    "timm/vit_tiny": ["blocks.0", "blocks.1"],
    "torchvision/vit": ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"],
    "torchvision/mobilenet_v2": [f"features.{i}" for i in range(1, 18)],
}


def _quiet_prepare(model: nn.Module, scheme: str = "bias", **kwargs: object) -> PreparedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers on stock autograd are reported; not what this checks
        return prepare(model, scheme, **kwargs)  # type: ignore[arg-type]


def _loss(output: object, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_of(output), target)


def _gradients(
    prepared: PreparedModel, x: torch.Tensor, y: torch.Tensor, seed: int = 0
) -> dict[str, torch.Tensor]:
    prepared.train()
    torch.manual_seed(seed)  # dropout draws the same masks in both runs
    _loss(prepared(x), y).backward()
    return {name: p.grad.clone() for name, p in prepared.trainable_parameters().items() if p.grad is not None}


def _assert_same_gradients(ours: dict[str, torch.Tensor], stock: dict[str, torch.Tensor]) -> None:
    """Equal at relative 1e-5, each tensor on its own scale but no finer than 1e-3 of the largest gradient
    (an attention key's bias has an exactly zero gradient: stock's is rounding noise of 1e-12)."""
    assert ours.keys() == stock.keys() and stock
    largest = max(grad.abs().max().item() for grad in stock.values())
    for name, grad in stock.items():
        scale = max(grad.abs().max().item(), 1e-3 * largest)
        torch.testing.assert_close(ours[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


def _library_model(name: str) -> nn.Module:
    model = LIBRARY_MODELS[name].build(seed=0)
    if name == "transformers/gpt2":
        model.config.use_cache = False  # a key/value cache would be updated again by the recomputation
    return model


@needs_libraries
@pytest.mark.slow
@pytest.mark.parametrize("name", list(LIBRARY_BLOCKS))
def test_library_blocks_recompute_with_stock_gradients_and_unchanged_keys(name: str) -> None:
    spec, model = LIBRARY_MODELS[name], _library_model(name)
    assert find_blocks(model) == LIBRARY_BLOCKS[name]
    stock = _quiet_prepare(model, memory_saving=False)
    ours = _quiet_prepare(model, recompute=True)
    plain = _quiet_prepare(model)
    assert ours.report.recompute == tuple(LIBRARY_BLOCKS[name]) and stock.report.recompute == ()
    assert ours.report.to_dict()["recompute"] == LIBRARY_BLOCKS[name]
    for block in LIBRARY_BLOCKS[name]:
        recomputed = ours.model.get_submodule(block)
        assert isinstance(recomputed, RecomputedBlock)
        assert isinstance(recomputed, type(model.get_submodule(block)))  # a twin of the block's own class
    # checkpoints do not change with recompute on or off
    assert list(ours.state_dict()) == list(plain.state_dict())
    assert list(ours.trainable_tensors()) == list(plain.trainable_tensors())
    x, y = spec.example(2), spec.targets(2)
    for module in (*stock.modules(), *ours.modules()):  # dropout and stochastic depth off
        if isinstance(module, nn.Dropout) or type(module).__name__ in ("StochasticDepth", "DropPath"):
            module.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits_of(ours(x)), logits_of(stock(x)), rtol=1e-5, atol=1e-5)
    _assert_same_gradients(_gradients(ours, x, y), _gradients(stock, x, y))


def test_zoo_vit_recomputes_exactly_with_dropout_on() -> None:
    model = create_model("vit", num_classes=4, dropout=0.2)
    blocks = find_blocks(model)
    assert len(blocks) == len(model.features.blocks) >= 2
    x, y = torch.randn(3, *model.input_shape), torch.tensor([0, 1, 3])
    stock = prepare(model, "bias", memory_saving=False)
    ours = prepare(model, "bias", recompute=True)
    assert ours.report.recompute == tuple(blocks)
    _assert_same_gradients(_gradients(ours, x, y, seed=5), _gradients(stock, x, y, seed=5))
    # the recomputation draws the forward's dropout masks, and leaves the random stream where it was
    torch.manual_seed(7)
    _loss(ours(x), y).backward()
    after_ours = torch.rand(4)
    torch.manual_seed(7)
    _loss(stock(x), y).backward()
    torch.testing.assert_close(after_ours, torch.rand(4))


def test_a_chosen_block_alone_recomputes_and_the_model_pickles() -> None:
    model = create_model("vit", num_classes=4)
    first = find_blocks(model)[0]
    ours = prepare(model, "lora", recompute=(first,))
    assert ours.report.recompute == (first,)
    assert sum(isinstance(m, RecomputedBlock) for m in ours.modules()) == 1
    stock = prepare(model, "lora", memory_saving=False)
    ours.load_trainable(stock.trainable_tensors())  # adapters start from the same values
    x, y = torch.randn(2, *model.input_shape), torch.tensor([1, 2])
    _assert_same_gradients(_gradients(ours, x, y), _gradients(stock, x, y))
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert isinstance(clone.model.get_submodule(first), RecomputedBlock)
        with torch.no_grad():
            torch.testing.assert_close(clone(x), ours(x))


def test_deltas_travel_between_recompute_on_and_off(tmp_path: Path) -> None:
    model = create_model("vit", num_classes=4)
    ours = prepare(model, "bias", recompute=True)
    with torch.no_grad():
        for p in ours.trainable_parameters().values():
            p.add_(0.01)
    path = ours.save_delta(tmp_path / "delta.safetensors")
    plain = prepare(model, "bias")
    plain.load_delta(path)
    for name, value in ours.trainable_tensors().items():
        torch.testing.assert_close(plain.trainable_tensors()[name], value)


def test_updating_norm_statistics_are_updated_once() -> None:
    model = create_model("mobilenetv2", num_classes=4, width_mult=0.35, resolution=32)
    blocks = find_blocks(model)
    assert blocks  # the zoo's registered blocks
    x, y = torch.randn(2, *model.input_shape), torch.tensor([0, 1])
    stock = prepare(model, {"name": "bias", "update_norm_stats": True}, memory_saving=False)
    ours = prepare(model, {"name": "bias", "update_norm_stats": True}, recompute=True)
    _assert_same_gradients(_gradients(ours, x, y), _gradients(stock, x, y))
    ours_buffers = dict(ours.named_buffers())
    for name, buffer in stock.named_buffers():
        torch.testing.assert_close(ours_buffers[name], buffer, msg=name)


@needs_libraries
@pytest.mark.slow
@pytest.mark.parametrize("name", ["transformers/bert", "transformers/vit"])
def test_bias_only_keeps_3x_less_than_stock_and_estimate_equals_measure(name: str) -> None:
    spec = LIBRARY_MODELS[name]
    model = spec.build(seed=0)
    x, y = spec.example(4), spec.targets(4)
    reports = {}
    for label, kwargs in {
        "stock": {"memory_saving": False},
        "recompute": {"recompute": True},
        "stock+recompute": {"memory_saving": False, "recompute": True},
    }.items():
        prepared = _quiet_prepare(model, **kwargs)
        measured = memory.measure(prepared, x, target=y, loss_fn=_loss)
        estimated = memory.estimate(prepared, tuple(x.shape), dtype=x.dtype, target=y, loss_fn=_loss)
        for field in ("activation_bytes", "peak_bytes"):
            est, real = getattr(estimated, field), getattr(measured, field)
            assert abs(est - real) <= 0.02 * real, f"{label} {field}: estimated {est}, measured {real}"
        reports[label] = measured
    assert reports["stock"].activation_bytes >= 3 * reports["recompute"].activation_bytes
    assert reports["stock+recompute"].peak_bytes < reports["stock"].peak_bytes
    # what a recomputed block keeps is counted under the block's name
    for block in LIBRARY_BLOCKS[name]:
        assert reports["recompute"].modules[f"model.{block}"] > 0


def test_a_model_without_blocks_says_so_and_changes_nothing() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.warns(UserWarning, match="no blocks to recompute"):
        prepared = prepare(model, "bias", recompute=True)
    assert prepared.report.recompute == ()
    assert not any(isinstance(m, RecomputedBlock) for m in prepared.modules())
    assert [type(m) for m in prepared.model] == [type(m) for m in prepare(model, "bias").model]


@pytest.mark.parametrize(
    ("choice", "match"),
    [
        ("features.blocks.0", "True, False or a tuple of block names"),
        ((1,), "True, False or a tuple of block names"),
        (("features.nope",), r"not a submodule of ViT; its blocks are \['features.blocks.0'"),
        (("",), "not a submodule"),
        (("features.blocks", "features.blocks.1"), "name only 'features.blocks'"),
    ],
)
def test_bad_choices_are_refused_with_what_works(choice: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        prepare(create_model("vit", num_classes=4), "bias", recompute=choice)  # type: ignore[arg-type]


@needs_libraries
def test_a_key_value_cache_conflicts_with_recompute_and_the_message_says_what_works() -> None:
    model = LIBRARY_MODELS["transformers/gpt2"].build(seed=0)
    assert model.config.use_cache
    with pytest.raises(RecomputeConflictError, match=r"GPT2Block .*DynamicCache.*use_cache = False"):
        _quiet_prepare(model, recompute=True)
    model.config.use_cache = False
    assert _quiet_prepare(model, recompute=True).report.recompute == tuple(
        LIBRARY_BLOCKS["transformers/gpt2"]
    )


class _ReadsTwice(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)  # type: ignore[attr-defined]
        return x * x

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        (_again,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return 2 * x * grad


class _Block(nn.Module):
    def __init__(self, twice: bool) -> None:
        super().__init__()
        self.a, self.b, self.twice = nn.Linear(4, 4), nn.Linear(4, 4), twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(_ReadsTwice.apply(h) if self.twice else h * h)


def test_a_recomputed_block_backs_up_twice_with_retain_graph_and_says_when_a_function_reads_twice() -> None:
    torch.manual_seed(0)
    stock = _Block(twice=False)
    ours = RecomputedBlock.from_module(copy.deepcopy(stock))
    x = torch.randn(3, 4, requires_grad=True)
    out = ours(x).sum()
    out.backward(retain_graph=True)
    first = x.grad.clone()
    out.backward()  # the dropped tensors are recomputed again for the second backward
    torch.testing.assert_close(x.grad, 2 * first)
    reference = x.detach().requires_grad_(True)
    stock(reference).sum().backward()
    torch.testing.assert_close(first, reference.grad)
    reads_twice = RecomputedBlock.from_module(_Block(twice=True))
    with pytest.raises(RuntimeError, match="read twice in one backward"):
        reads_twice(x).sum().backward()
