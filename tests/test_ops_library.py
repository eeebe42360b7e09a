"""Memory-saving ops on the models users bring: transformers, timm and torchvision models and layers.

Every model of ``bench.library_models`` is converted under the bias scheme (biases and the head train),
the last-layer scheme (only the head trains) and with an input that needs a gradient; its outputs and
every gradient must equal stock PyTorch's on an untouched copy, every leaf layer holding parameters must
have been converted (still an instance of its own class), and the bias scheme must keep a stated fraction
of stock's activation bytes.
"""

from __future__ import annotations

import copy
import functools
import importlib
import logging
import pickle

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bench.library_models import LIBRARY_MODELS, import_torchvision, library_available, logits_of
from memory import measure
from memory.measure import SavedTensorTracker
from ondevice import ops
from ondevice.errors import ConfigError
from ondevice.ops import registry
from ondevice.ops.registry import MemorySavingModule, qualified_name
from ondevice.ops.sequential import MemorySavingSequential

pytestmark = pytest.mark.skipif(
    not all(library_available(lib) for lib in ("transformers", "timm", "torchvision")),
    reason="needs transformers, timm and torchvision (the dev extra)",
)

RTOL, ATOL = 1e-5, 1e-8
SCHEMES = ("bias", "last_layer", "input")


@functools.cache
def _built(name: str) -> nn.Module:
    return LIBRARY_MODELS[name].build(0)


def _head(model: nn.Module) -> nn.Module:
    """The classification head: the last Linear layer (timm, torchvision and transformers alike)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _prepared(name: str, scheme: str) -> nn.Module:
    """A fresh copy in train mode with frozen norms, trained as ``scheme`` says, by hand."""
    model = copy.deepcopy(_built(name)).train()
    for pname, p in model.named_parameters():
        p.requires_grad_(scheme == "bias" and pname.endswith(".bias"))
    for p in _head(model).parameters():
        p.requires_grad_(True)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def _loss(output: object, target: Tensor) -> Tensor:
    return F.cross_entropy(logits_of(output), target)


def _step(model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, list[Tensor | None]]:
    for p in model.parameters():
        p.grad = None
    x = x.detach().requires_grad_(x.requires_grad)
    torch.manual_seed(0)
    out = logits_of(model(x))
    _loss(out, target).backward()
    return out.detach(), [x.grad, *(p.grad for p in model.parameters())]


def _cases() -> list[tuple[str, str]]:
    return [
        (name, scheme)
        for name, spec in LIBRARY_MODELS.items()
        for scheme in SCHEMES
        if not (scheme == "input" and spec.kind == "text-transformer")  # token ids take no gradient
    ]


# ----------------------------------------------------------------------------------- dispatch and registry


def test_library_fingerprints_match_the_installed_libraries() -> None:
    """A library upgrade that changes a mirrored forward fails here (and runs stock for users)."""
    assert len(ops.library_layers()) >= 20
    for path in ops.library_layers():
        module_name, _, class_name = path.rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        entry = registry._BY_NAME[path]
        assert registry.source_fingerprint(cls, entry.relies_on, entry.also) == entry.fingerprint, path
        support = ops.op_support(cls)
        assert support.supported and support.op_for == path, support


def test_importing_ondevice_imports_no_library() -> None:
    import subprocess
    import sys

    libraries = "{'timm', 'transformers', 'torchvision'}"
    code = f"import sys, ondevice, ondevice.ops; print(sorted({libraries} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _Drifted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def test_a_library_layer_whose_source_drifted_runs_stock_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = qualified_name(_Drifted)
    ops.register_op(path, lambda m, o: nn.Identity(), fingerprint="0" * 16, written_for="lib 0.1")
    try:
        model = nn.Sequential(_Drifted(), _Drifted())
        with caplog.at_level(logging.WARNING, logger="ondevice.ops.registry"):
            ops.convert(model)
            support = ops.op_support(model[0])
        assert type(model[0]) is _Drifted and type(model[1]) is _Drifted
        assert not support.supported and "differs" in support.reason and "lib 0.1" in support.reason
        assert ops.unsupported_leaves(model) == {"0": "_Drifted", "1": "_Drifted"}
        assert sum("_Drifted" in r.getMessage() for r in caplog.records) == 1
        registry._BY_NAME[path] = registry._Entry(
            lambda m, o: nn.Identity(), ("forward",), registry.source_fingerprint(_Drifted), (), ""
        )
        assert ops.op_support(_Drifted).supported  # the fingerprint of the installed source: applies
    finally:
        registry._BY_NAME.pop(path)
    with pytest.raises(ConfigError, match="qualified name"):
        ops.register_op("NoDots", lambda m, o: m, fingerprint="x")
    with pytest.raises(ConfigError, match="fingerprint"):
        ops.register_op("pkg.mod.Layer", lambda m, o: m)


def test_a_subclass_with_its_own_forward_is_reported_and_left_stock() -> None:
    timm_layers = importlib.import_module("timm.layers")

    class Scaled(timm_layers.BatchNormAct2d):  # type: ignore[misc, name-defined]
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 2

    class Plain(timm_layers.BatchNormAct2d):  # type: ignore[misc, name-defined]
        pass

    model = nn.Sequential(Scaled(4), Plain(4)).eval()
    support = ops.op_support(model[0])
    assert not support.supported and "Scaled.forward" in support.reason
    assert ops.op_support(model[1]).op_for == "timm.layers.norm_act.BatchNormAct2d"
    ops.convert(model)
    assert type(model[0]) is Scaled
    assert isinstance(model[1], MemorySavingModule) and isinstance(model[1], Plain)
    assert isinstance(model[1].act, ops.activation.MemorySavingReLU)  # its children are converted too
    assert ops.unsupported_leaves(model) == {"0": "Scaled"}
    ops.restore(model)
    assert type(model[1]) is Plain and type(model[1].act) is nn.ReLU


# ------------------------------------------------------------------------- whole models against stock

# Library layer classes each model must have converted (by class name), on top of every leaf with
# parameters: the dispatch this file is about.
_EXPECTED_TWINS: dict[str, set[str]] = {
    "transformers/bert": {"GELUActivation", "Embedding", "Linear"},
    "transformers/gpt2": {"Conv1D", "NewGELUActivation", "Embedding"},
    "transformers/vit": {"GELUActivation", "Linear"},
    "transformers/efficientnet": {"EfficientNetDepthwiseConv2d"},
    "transformers/convnext": {"ConvNextLayerNorm", "GELUActivation"},
    "timm/mobilenetv2_100": {"BatchNormAct2d"},
    "timm/efficientnet_b0": {"BatchNormAct2d"},
    "timm/mobilenetv3_small_100": {"BatchNormAct2d"},
    "timm/convnext_atto": {"LayerNorm2d", "GELU"},
    "timm/vit_tiny": {"LayerNorm", "GELU"},
    "torchvision/mobilenet_v2": {"Conv2dNormActivation"},
    "torchvision/efficientnet_b0": {"Conv2dNormActivation"},
    "torchvision/vit": {"MultiheadAttention", "NonDynamicallyQuantizableLinear"},
}


@pytest.mark.parametrize("name", list(LIBRARY_MODELS))
def test_every_leaf_with_parameters_and_every_library_layer_is_converted(name: str) -> None:
    stock = _prepared(name, "bias")
    ours = ops.convert(copy.deepcopy(stock))
    assert list(ours.state_dict()) == list(stock.state_dict())
    converted: set[str] = set()
    ours_modules = dict(ours.named_modules())
    for qname, module in stock.named_modules():
        twin = ours_modules[qname]
        assert isinstance(twin, type(module)), f"{qname}: {type(twin).__name__} is no {type(module).__name__}"
        if isinstance(twin, MemorySavingModule | MemorySavingSequential):
            assert type(twin) is not type(module)
            converted.add(type(module).__name__)
        is_leaf = next(module.children(), None) is None
        if is_leaf and any(True for _ in module.parameters(recurse=False)):
            assert isinstance(twin, MemorySavingModule), f"{qname} ({type(module).__name__}) not converted"
    assert _EXPECTED_TWINS.get(name, set()) <= converted, _EXPECTED_TWINS[name] - converted
    if name == "timm/convnext_atto":  # made twin classes pickle (torch.save of a whole model)
        again = pickle.loads(pickle.dumps(ours))
        assert type(again.stem[1]) is type(ours.stem[1])
        assert type(ours.stem[1]).__name__ == "MemorySavingLayerNorm2d"
    leaves = {n for n, m in ours.named_modules() if next(m.children(), None) is None}
    assert not set(ops.unsupported_leaves(ours)) & leaves
    restored = ops.restore(ours)
    assert [type(m) for m in restored.modules()] == [type(m) for m in stock.modules()]


@pytest.mark.parametrize(("name", "scheme"), _cases())
def test_outputs_and_gradients_equal_stock(name: str, scheme: str) -> None:
    spec = LIBRARY_MODELS[name]
    stock = _prepared(name, "last_layer" if scheme == "input" else scheme)
    ours = ops.convert(copy.deepcopy(stock))
    x, target = spec.example(2), spec.targets(2)
    if scheme == "input":
        x.requires_grad_(True)
    out_stock, grads_stock = _step(stock, x, target)
    out_ours, grads_ours = _step(ours, x, target)
    torch.testing.assert_close(out_ours, out_stock, rtol=RTOL, atol=ATOL)
    assert any(g is not None for g in grads_stock)
    for i, (a, b) in enumerate(zip(grads_stock, grads_ours, strict=True)):
        assert (a is None) == (b is None), f"gradient {i} defined in only one of stock/ours"
        if a is not None:
            torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL, msg=f"gradient {i}")


# Bias scheme, stock activation bytes / converted ones, at least (batch 2; measured on CPU).
_MIN_RATIO: dict[str, float] = {
    "timm/mobilenetv2_100": 40.0,
    "transformers/mobilenetv2": 50.0,
    "torchvision/mobilenet_v2": 50.0,
    "timm/efficientnet_b0": 1.8,
    "transformers/efficientnet": 1.8,
    "torchvision/efficientnet_b0": 1.8,
    "timm/resnet18": 12.0,
    "transformers/resnet": 12.0,
    "torchvision/resnet18": 12.0,
    "timm/convnext_atto": 1.15,
    "transformers/convnext": 1.15,
    "timm/mobilenetv3_small_100": 2.5,
    "torchvision/mobilenet_v3_small": 2.5,
    "transformers/gpt2": 1.5,  # NewGELUActivation keeps its input only
}


@pytest.mark.parametrize("name", list(LIBRARY_MODELS))
def test_bias_scheme_keeps_a_fraction_of_stocks_activation_bytes(name: str) -> None:
    spec = LIBRARY_MODELS[name]
    stock = _prepared(name, "bias")
    ours = ops.convert(copy.deepcopy(stock))
    x, target = spec.example(2), spec.targets(2)
    stock_bytes = measure(stock, x, target=target, loss_fn=_loss).activation_bytes
    ours_bytes = measure(ours, x, target=target, loss_fn=_loss).activation_bytes
    assert ours_bytes <= stock_bytes
    ratio = stock_bytes / max(ours_bytes, 1)
    assert ratio >= _MIN_RATIO.get(name, 1.0), f"{name}: {stock_bytes} / {ours_bytes} = {ratio:.2f}"


# --------------------------------------------------------------------------------- single library layers


def _saved_bytes(module: nn.Module, x: Tensor) -> int:
    tracker = SavedTensorTracker(exclude=[*module.parameters(), *module.buffers()])
    with tracker.track():
        out = module(x)
    saved = tracker.saved_bytes
    del out
    return saved


def _same_grads(stock: nn.Module, ours: nn.Module, x: Tensor, *, exact: bool) -> None:
    grads = []
    torch.manual_seed(3)
    grad_out = torch.randn_like(stock(x))
    for module in (stock, ours):
        xi = x.detach().clone().requires_grad_(x.requires_grad)
        for p in module.parameters():
            p.grad = None
        out = module(xi)
        out.backward(grad_out)
        grads.append([out.detach(), xi.grad, *(p.grad for p in module.parameters())])
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is None:
            continue
        if exact:
            assert torch.equal(a, b), f"differs by {(a - b).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


def _activation_names() -> list[str]:
    return sorted(importlib.import_module("transformers.activations").ACT2CLS)


@pytest.mark.parametrize("key", _activation_names())
def test_transformers_activations_compute_stock_values_and_keep_at_most_what_stock_keeps(key: str) -> None:
    act = importlib.import_module("transformers.activations").ACT2FN[key]
    if key in ("xielu", "prelu"):  # parameters of their own, no op (xIELU has a CUDA kernel path)
        assert not ops.op_support(act).supported
        return
    new = ops.convert(copy.deepcopy(act))
    assert isinstance(new, MemorySavingModule) and isinstance(new, type(act)), key
    x = (torch.randn(2, 3, 8) * 3).requires_grad_()
    _same_grads(act, new, x, exact=True)
    assert _saved_bytes(new, x) <= _saved_bytes(act, x)


@pytest.mark.parametrize(
    "key", ["gelu_new", "gelu_fast", "quick_gelu", "gelu_python", "gelu_accurate", "gelu_10"]
)
def test_expression_activations_keep_only_their_input(key: str) -> None:
    act = importlib.import_module("transformers.activations").ACT2FN[key]
    x = torch.randn(2, 64, requires_grad=True)
    stock_bytes, ours_bytes = _saved_bytes(act, x), _saved_bytes(ops.convert(copy.deepcopy(act)), x)
    assert ours_bytes == x.numel() * 4 < stock_bytes


def _timm_layer(name: str, *args: object) -> nn.Module:
    return getattr(importlib.import_module("timm.layers"), name)(*args)


# What the converted layer keeps with only its bias trainable: "nothing" (stock keeps something),
# "stock" (stock already keeps no more), "mask" (a 1-bit ReLU mask) or "input" (one input-sized tensor).
_TIMM_LAYERS: list[tuple[str, tuple[object, ...], tuple[int, ...], str, str]] = [
    ("LayerNorm", (8,), (2, 5, 8), "nothing", "stock"),
    ("LayerNorm2d", (8,), (2, 8, 4, 4), "nothing", "stock"),
    ("Linear", (8, 3), (2, 5, 8), "stock", "stock"),
    ("Conv2dSame", (8, 4, 3, 2), (2, 8, 7, 6), "nothing", "nothing"),
    ("Conv2dSame", (8, 8, 5, 1, 0, 1, 8), (2, 8, 6, 5), "nothing", "nothing"),
    ("BatchNormAct2d", (8,), (2, 8, 4, 4), "mask", "mask"),
    ("BatchNormAct2d", (8, 1e-5, 0.1, True, True, True, nn.SiLU), (2, 8, 4, 4), "input", "input"),
    ("GELU", (), (2, 8), "stock", "stock"),
    ("GELUTanh", (), (2, 8), "stock", "stock"),
]


@pytest.mark.parametrize(("layer", "args", "shape", "keeps", "keeps_with_input_grad"), _TIMM_LAYERS)
@pytest.mark.parametrize("input_grad", [False, True])
def test_timm_layers_match_stock_and_keep_what_their_gradients_need(
    layer: str, args: tuple[object, ...], shape: tuple[int, ...], keeps: str, keeps_with_input_grad: str,
    input_grad: bool,
) -> None:  # fmt: skip
    torch.manual_seed(0)
    stock = getattr(importlib.import_module("timm.layers"), layer)(*args).eval()
    for name, p in stock.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    ours = ops.convert(copy.deepcopy(stock))
    assert isinstance(ours, MemorySavingModule) and isinstance(ours, type(stock))
    x = torch.randn(shape).requires_grad_(input_grad)
    if not (input_grad or any(p.requires_grad for p in stock.parameters())):
        return
    _same_grads(stock, ours, x, exact=True)
    expected = keeps_with_input_grad if input_grad else keeps
    stock_bytes, ours_bytes = _saved_bytes(stock, x), _saved_bytes(ours, x)
    if expected == "stock":
        assert ours_bytes == stock_bytes
    elif expected == "nothing":
        assert ours_bytes == 0 < stock_bytes
    else:
        assert ours_bytes == (x.numel() // 8 if expected == "mask" else x.numel() * 4) < stock_bytes


def test_hf_conv1d_and_convnext_layer_norm_match_stock() -> None:
    pytorch_utils = importlib.import_module("transformers.pytorch_utils")
    convnext = importlib.import_module("transformers.models.convnext.modeling_convnext")
    torch.manual_seed(0)
    conv1d = pytorch_utils.Conv1D(6, 4)
    conv1d.weight.requires_grad_(False)
    ours = ops.convert(copy.deepcopy(conv1d))
    assert isinstance(ours, pytorch_utils.Conv1D) and isinstance(ours, MemorySavingModule)
    x = torch.randn(2, 3, 4, requires_grad=True)
    _same_grads(conv1d, ours, x, exact=True)
    assert _saved_bytes(ours, x) == 0  # frozen weight: addmm keeps nothing for the input's gradient
    for data_format, shape in (("channels_first", (2, 6, 3, 3)), ("channels_last", (2, 3, 3, 6))):
        norm = convnext.ConvNextLayerNorm(6, data_format=data_format)
        norm.weight.requires_grad_(False)
        ours = ops.convert(copy.deepcopy(norm))
        assert isinstance(ours, convnext.ConvNextLayerNorm) and isinstance(ours, MemorySavingModule)
        x = torch.randn(shape)
        _same_grads(norm, ours, x, exact=True)
        assert _saved_bytes(ours, x) == 0 < _saved_bytes(norm, x)


def test_multihead_attention_and_embedding_match_stock() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    for name, p in mha.named_parameters():
        p.requires_grad_(name.endswith("bias"))

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha

        def forward(self, x: Tensor) -> Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    stock = SelfAttention()
    ours = ops.convert(copy.deepcopy(stock))
    assert isinstance(ours.attn, ops.attention.MemorySavingMultiheadAttention)
    assert isinstance(ours.attn.out_proj, nn.modules.linear.NonDynamicallyQuantizableLinear)
    assert isinstance(ours.attn.out_proj, ops.linear.MemorySavingLinear)
    _same_grads(stock, ours, torch.randn(2, 5, 8, requires_grad=True), exact=True)
    embedding = nn.Embedding(10, 4, padding_idx=0)
    ours_embedding = ops.convert(copy.deepcopy(embedding))
    assert isinstance(ours_embedding, ops.embedding.MemorySavingEmbedding)
    ids = torch.tensor([[0, 3, 3, 9]])
    embedding.weight.requires_grad_(False)
    ours_embedding.weight.requires_grad_(False)
    assert _saved_bytes(ours_embedding, ids) == 0


def test_sequential_subclasses_keeping_sequentials_forward_become_memory_saving_and_come_back() -> None:
    misc = import_torchvision().ops.misc
    block = nn.Sequential(misc.Conv2dNormActivation(3, 8, 3, activation_layer=nn.ReLU6)).eval()
    for name, p in block.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    stock = copy.deepcopy(block)
    ops.convert(block)
    assert isinstance(block[0], MemorySavingSequential) and isinstance(block[0], misc.Conv2dNormActivation)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    _same_grads(stock, block, x, exact=True)
    assert _saved_bytes(block, x) == 2 * 8 * 6 * 6 // 8  # the ReLU6 mask: 1 bit per output element
    ops.restore(block)
    assert type(block[0]) is misc.Conv2dNormActivation and "_plan" not in vars(block[0])
