"""Memory-saving ops: gradients equal stock PyTorch's, and each op keeps only what its gradients need."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from memory.measure import SavedTensorTracker
from ondevice import ops
from ondevice.errors import ConfigError, UnknownNameError
from ondevice.ops import _bitmask
from ondevice.ops._compress import compressed_nbytes
from ondevice.ops.registry import MemorySavingModule
from ondevice.schemes.sparse import PartialChannelUpdate

# ---------------------------------------------------------------------------------------------- helpers


def _special_values(x: Tensor) -> Tensor:
    """Put values on the ReLU/ReLU6 boundaries (0, 6, -0.0) into ``x``, where stock's gradient is 0."""
    flat = x.detach().view(-1)
    flat[:5] = torch.tensor([0.0, 6.0, -0.0, 3.0, -2.0], dtype=x.dtype)
    return x


def _run(
    module: nn.Module, x: Tensor, grad_out: Tensor | None, seed: int
) -> tuple[Tensor, list[Tensor | None]]:
    """Output and the gradients of ``x`` and every parameter after one backward."""
    params = list(module.parameters())
    for t in [x, *params]:
        t.grad = None
    torch.manual_seed(seed)
    out = module(x)
    if grad_out is None:
        return out, []
    out.backward(grad_out)
    return out.detach(), [t.grad for t in [x, *params]]


def _assert_same_grads(stock: nn.Module, ours: nn.Module, x: Tensor, *, exact: bool = True) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        probe = stock(x)
    grad_out = (
        torch.randn_like(probe) if probe.requires_grad or x.requires_grad or _any_trains(stock) else None
    )
    out_stock, grads_stock = _run(stock, x, grad_out, seed=7)
    if not out_stock.requires_grad and not any(g is not None for g in grads_stock):
        grad_out = None
    out_ours, grads_ours = _run(ours, x, grad_out, seed=7)
    assert torch.equal(out_stock, out_ours)
    assert len(grads_stock) == len(grads_ours)
    for i, (a, b) in enumerate(zip(grads_stock, grads_ours, strict=True)):
        assert (a is None) == (b is None), f"gradient {i} defined in only one of stock/ours"
        if a is None:
            continue
        if exact:
            assert torch.equal(a, b), f"gradient {i} differs by {(a - b).abs().max().item():.3g}"
        else:
            tol = 1e-6 if a.dtype == torch.float32 else 1e-12
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _any_trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _saved_bytes(module: nn.Module, x: Tensor) -> int:
    tracker = SavedTensorTracker(exclude=[*module.parameters(), *module.buffers()])
    with tracker.track():
        out = module(x)
    saved = tracker.saved_bytes
    del out
    return saved


# ------------------------------------------------------------------------------------- layer table

# (id, factory, input shape, saved bytes as f(x_grad, w_grad, b_grad, x) for the float32 case)
Saved = Callable[[bool, bool, bool, Tensor], int]


def _nbytes(x: Tensor) -> int:
    return x.numel() * x.element_size()


def _keeps_input_if_weight(xg: bool, wg: bool, bg: bool, x: Tensor) -> int:
    return _nbytes(x) if wg else 0


def _norm_stats(groups_of: Callable[[Tensor], int]) -> Saved:
    def saved(xg: bool, wg: bool, bg: bool, x: Tensor) -> int:
        return _nbytes(x) + 2 * groups_of(x) * x.element_size() if (xg or wg) else 0

    return saved


def _bn(cls: type[nn.Module], channels: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        bn = cls(channels)
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
        return bn.eval()

    return make


def _partial(base: Callable[[], nn.Module], index: list[int]) -> Callable[[], nn.Module]:
    return lambda: PartialChannelUpdate(base(), torch.tensor(index))


def _partial_saved(index: list[int], dim: int) -> Saved:
    def saved(xg: bool, wg: bool, bg: bool, x: Tensor) -> int:
        return _nbytes(x) // x.shape[dim] * len(index) if wg else 0

    return saved


PARAM_LAYERS: list[tuple[str, Callable[[], nn.Module], tuple[int, ...], Saved]] = [
    ("conv2d", lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 9, 9), _keeps_input_if_weight),
    ("conv2d-stride2", lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 9, 9), _keeps_input_if_weight),
    (
        "conv2d-depthwise",
        lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6),
        (2, 6, 9, 9),
        _keeps_input_if_weight,
    ),
    (
        "conv2d-grouped",
        lambda: nn.Conv2d(6, 8, 3, groups=2, dilation=2),
        (2, 6, 9, 9),
        _keeps_input_if_weight,
    ),
    ("conv2d-1x1", lambda: nn.Conv2d(6, 8, 1), (2, 6, 9, 9), _keeps_input_if_weight),
    # asymmetric "same" padding keeps the padded input, as stock does
    ("conv2d-same", lambda: nn.Conv2d(6, 8, 4, padding="same"), (2, 6, 9, 9), None),
    ("conv2d-reflect", lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"), (2, 6, 9, 9), None),
    ("conv1d", lambda: nn.Conv1d(6, 8, 3, padding=1), (2, 6, 17), _keeps_input_if_weight),
    ("conv1d-depthwise", lambda: nn.Conv1d(6, 6, 5, padding=2, groups=6), (2, 6, 17), _keeps_input_if_weight),
    ("linear", lambda: nn.Linear(12, 10), (5, 12), _keeps_input_if_weight),
    ("linear-3d", lambda: nn.Linear(12, 10), (3, 5, 12), _keeps_input_if_weight),
    ("batchnorm2d-eval", _bn(nn.BatchNorm2d, 6), (2, 6, 5, 5), _keeps_input_if_weight),
    ("batchnorm1d-eval", _bn(nn.BatchNorm1d, 6), (4, 6), _keeps_input_if_weight),
    ("batchnorm1d-eval-3d", _bn(nn.BatchNorm1d, 6), (4, 6, 7), _keeps_input_if_weight),
    ("groupnorm", lambda: nn.GroupNorm(3, 6), (2, 6, 5, 5), _norm_stats(lambda x: x.shape[0] * 3)),
    ("layernorm", lambda: nn.LayerNorm(12), (3, 5, 12), _norm_stats(lambda x: x.numel() // 12)),
    (
        "partial-conv2d",
        _partial(lambda: nn.Conv2d(6, 8, 3, padding=1), [1, 4]),
        (2, 6, 9, 9),
        _partial_saved([1, 4], 1),
    ),
    (
        "partial-linear",
        _partial(lambda: nn.Linear(12, 10), [0, 3, 11]),
        (3, 5, 12),
        _partial_saved([0, 3, 11], -1),
    ),
]

CONFIGS = [c for c in itertools.product([True, False], repeat=3) if any(c)]


def _configure(module: nn.Module, w_grad: bool, b_grad: bool) -> None:
    """Freeze or unfreeze the layer's weight (the trained columns, for a partial layer) and bias."""
    if isinstance(module, PartialChannelUpdate):
        module.weight_update.requires_grad_(w_grad)
        module.base.bias.requires_grad_(b_grad)
    else:
        module.weight.requires_grad_(w_grad)
        module.bias.requires_grad_(b_grad)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("x_grad", "w_grad", "b_grad"), CONFIGS, ids=lambda v: str(int(v)))
@pytest.mark.parametrize(("name", "make", "shape", "saved"), PARAM_LAYERS, ids=[r[0] for r in PARAM_LAYERS])
def test_param_layer_gradients_match_stock(
    name: str, make: Callable[[], nn.Module], shape: tuple[int, ...], saved: Saved | None,
    x_grad: bool, w_grad: bool, b_grad: bool, dtype: torch.dtype,
) -> None:  # fmt: skip
    stock = make().to(dtype)
    _configure(stock, w_grad, b_grad)
    ours = ops.convert(copy.deepcopy(stock))
    assert isinstance(ours, MemorySavingModule)
    x = torch.randn(shape, dtype=dtype, requires_grad=x_grad)
    # Partial-channel weight gradients are one GEMM over fewer columns: equal up to summation order.
    _assert_same_grads(stock, ours, x, exact=not name.startswith("partial"))
    if saved is not None:
        assert _saved_bytes(ours, x) == saved(x_grad, w_grad, b_grad, x)


def _mask_bytes(x: Tensor, mode: str) -> int:
    return _bitmask.mask_nbytes(x.numel(), mode)  # type: ignore[arg-type]


def _full(x: Tensor, mode: str) -> int:
    return _nbytes(x)


def _nothing(x: Tensor, mode: str) -> int:
    return 0


def _dropout_bytes(x: Tensor, mode: str) -> int:
    return _mask_bytes(x, mode) + x.element_size()  # the mask and the scalar 1 / (1 - p)


# (id, factory, input shape, saved bytes as f(x, mask mode))
PARAM_FREE: list[tuple[str, Callable[[], nn.Module], tuple[int, ...], Callable[[Tensor, str], int]]] = [
    ("relu", nn.ReLU, (2, 5, 7, 3), _mask_bytes),
    ("relu-inplace", lambda: nn.ReLU(inplace=True), (2, 5, 7, 3), _mask_bytes),
    ("relu6", nn.ReLU6, (2, 5, 7, 3), _mask_bytes),
    ("relu6-inplace", lambda: nn.ReLU6(inplace=True), (2, 5, 7, 3), _mask_bytes),
    ("leaky-relu", lambda: nn.LeakyReLU(0.1), (3, 5, 8), _mask_bytes),
    ("silu", nn.SiLU, (3, 5, 8), _full),
    ("gelu", nn.GELU, (3, 5, 8), _full),
    ("gelu-tanh", lambda: nn.GELU(approximate="tanh"), (3, 5, 8), _full),
    ("hardswish", nn.Hardswish, (3, 5, 8), _full),
    ("sigmoid", nn.Sigmoid, (3, 5, 8), _full),
    ("tanh", nn.Tanh, (3, 5, 8), _full),
    ("avgpool2d", lambda: nn.AvgPool2d(2), (2, 3, 8, 8), _nothing),
    (
        "avgpool2d-pad",
        lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
        (2, 3, 9, 9),
        _nothing,
    ),
    ("avgpool1d", lambda: nn.AvgPool1d(3, 2, 1), (2, 3, 11), _nothing),
    ("maxpool2d", lambda: nn.MaxPool2d(2), (2, 3, 8, 8), lambda x, m: x.numel() // 4 * 4),  # int32 indices
    ("maxpool2d-pad", lambda: nn.MaxPool2d(3, 2, 1), (2, 3, 9, 9), lambda x, m: 2 * 3 * 5 * 5 * 4),
    ("maxpool1d", lambda: nn.MaxPool1d(2), (2, 3, 10), lambda x, m: x.numel() // 2 * 4),
    ("adaptiveavgpool2d-1", lambda: nn.AdaptiveAvgPool2d(1), (2, 3, 8, 8), _nothing),
    ("adaptiveavgpool2d-3", lambda: nn.AdaptiveAvgPool2d((3, None)), (2, 3, 8, 7), _nothing),
    ("adaptiveavgpool1d-4", lambda: nn.AdaptiveAvgPool1d(4), (2, 3, 10), _nothing),
    ("dropout", lambda: nn.Dropout(0.3), (4, 5, 6), _dropout_bytes),
    ("dropout-inplace", lambda: nn.Dropout(0.5, inplace=True), (4, 5, 6), _dropout_bytes),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("mask", ["bit", "byte"])
@pytest.mark.parametrize(("name", "make", "shape", "saved"), PARAM_FREE, ids=[r[0] for r in PARAM_FREE])
def test_param_free_layer_gradients_match_stock(
    name: str, make: Callable[[], nn.Module], shape: tuple[int, ...], saved: Callable[[Tensor, str], int],
    mask: str, dtype: torch.dtype,
) -> None:  # fmt: skip
    stock = make().train()
    ours = ops.convert(copy.deepcopy(stock), mask=mask)  # type: ignore[arg-type]
    leaf = _special_values(torch.randn(shape, dtype=dtype) * 4).requires_grad_(True)
    inplace = getattr(stock, "inplace", False)
    # In-place layers need a non-leaf input; both runs get the same fresh one.
    run_stock = (lambda t: stock(t * 1)) if inplace else stock
    run_ours = (lambda t: ours(t * 1)) if inplace else ours
    _assert_same_grads(_Wrap(run_stock), _Wrap(run_ours), leaf)
    assert _saved_bytes(_Wrap(run_ours), leaf) == saved(leaf, mask)


class _Wrap(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def test_relu6_mask_matches_hardtanh_backward_at_the_boundaries() -> None:
    x = torch.tensor(
        [-1.0, -0.0, 0.0, 1e-30, 1e-45, 3.0, 6.0 - 4.8e-7, 6.0, 6.5, float("inf")], requires_grad=True
    )
    for mode in ("bit", "byte"):
        layer = ops.convert(nn.ReLU6(), mask=mode)
        layer(x).backward(torch.ones_like(x))
        expected = torch.ops.aten.hardtanh_backward(torch.ones_like(x), x.detach(), 0.0, 6.0)
        assert torch.equal(x.grad, expected)
        assert x.grad.tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
        x.grad = None


def test_a_frozen_layer_whose_input_needs_no_grad_builds_no_graph() -> None:
    conv = ops.convert(nn.Conv2d(3, 4, 3).requires_grad_(False))
    assert _saved_bytes(conv, torch.randn(1, 3, 5, 5)) == 0
    assert not conv(torch.randn(1, 3, 5, 5)).requires_grad


def test_batchnorm_in_train_mode_falls_back_to_stock() -> None:
    stock = nn.BatchNorm2d(4).train()
    ours = ops.convert(copy.deepcopy(stock))
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    grad_out = torch.randn(3, 4, 5, 5)
    out_stock, grads_stock = _run(stock, x, grad_out, seed=0)
    out_ours, grads_ours = _run(ours, x, grad_out, seed=0)
    assert torch.equal(out_stock, out_ours)
    assert all(torch.equal(a, b) for a, b in zip(grads_stock, grads_ours, strict=True))
    assert torch.equal(stock.running_mean, ours.running_mean)
    assert torch.equal(stock.running_var, ours.running_var)
    assert _saved_bytes(ours, x) == _saved_bytes(stock, x)


def test_no_grad_forward_is_stock_forward() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval(), nn.ReLU6(), nn.AdaptiveAvgPool2d(1))
    ours = ops.convert(copy.deepcopy(model))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), ours(x))


# ------------------------------------------------------------------------------- masks and compression


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 64, 1000, 4099])
def test_bit_packing_roundtrips_and_both_paths_agree(numel: int) -> None:
    mask = torch.rand(numel) > 0.5
    packed = _bitmask._pack_numpy(mask)
    assert packed.numel() == math.ceil(numel / 8)
    assert torch.equal(packed, _bitmask._pack_arith(mask))
    assert torch.equal(packed, torch.from_numpy(np.packbits(mask.numpy(), bitorder="little")))
    for dtype in (torch.uint8, torch.float32, torch.float64):
        for unpack in (_bitmask._unpack_table, _bitmask._unpack_arith):
            out = unpack(packed, numel, dtype)
            assert out.dtype == dtype
            assert torch.equal(out, mask.to(dtype))


def test_packing_reads_masks_in_logical_order() -> None:
    mask = torch.rand(2, 3, 4, 5) > 0.5
    channels_last = mask.to(memory_format=torch.channels_last)
    assert torch.equal(_bitmask.pack_bits(channels_last), _bitmask.pack_bits(mask))


@pytest.mark.parametrize(
    ("make", "bound"),
    # Hardswish's derivative jumps at +-3, so inputs that round across a jump cost more.
    [(nn.SiLU, 1e-2), (nn.GELU, 1e-2), (nn.Hardswish, 6e-2), (nn.Sigmoid, 1e-2), (nn.Tanh, 1e-2)],
)
def test_int8_compression_bounds_the_gradient_error(make: Callable[[], nn.Module], bound: float) -> None:
    stock = make()
    ours = ops.convert(make(), compress="int8")
    x = (torch.randn(4, 8, 16, 16) * 3).requires_grad_(True)
    grad_out = torch.randn(4, 8, 16, 16)
    stock(x).backward(grad_out)
    exact = x.grad.clone()
    x.grad = None
    ours(x).backward(grad_out)
    rel = (x.grad - exact).norm() / exact.norm()
    assert rel < bound, f"relative gradient error {rel:.3g}"
    assert _saved_bytes(ours, x) == compressed_nbytes(x.numel())
    assert _saved_bytes(ours, x) < _nbytes(x) / 3


# ------------------------------------------------------------------------------------- small models


class _Block(nn.Module):
    """MobileNetV2-like inverted residual: expand 1x1 -> depthwise 3x3 -> project 1x1, residual add."""

    def __init__(self, channels: int, expand: int = 3, lite: bool = False) -> None:
        super().__init__()
        hidden = channels * expand
        self.conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )  # fmt: skip
        # TinyTL's lite residual: pool -> group conv -> norm -> ReLU -> 1x1 conv -> norm -> upsample.
        self.lite = (
            nn.Sequential(
                nn.AvgPool2d(2),
                nn.Conv2d(channels, channels, 5, padding=2, groups=2, bias=False),
                nn.GroupNorm(2, channels),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 1, bias=False),
                nn.GroupNorm(2, channels),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            )
            if lite
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = x + self.conv(x)
        return out + self.lite(x) if self.lite is not None else out


def _convnet(lite: bool = False) -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        _Block(8, lite=lite), _Block(8, lite=lite), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(16, 5),
    )  # fmt: skip
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


class _TransformerBlock(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, lora_rank: int = 0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim))
        # LoRA on the projection: two plain Linear layers, A: dim -> r, B: r -> dim (B starts at zero).
        self.lora = nn.Sequential(
            nn.Linear(dim, lora_rank, bias=False), nn.Linear(lora_rank, dim, bias=False)
        )
        nn.init.zeros_(self.lora[1].weight)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1)
        h = (attn @ v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(h) + self.lora(h)
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


def _freeze(model: nn.Module, scheme: str) -> None:
    names = [n for n, _ in model.named_parameters()]
    last = names[-2:]  # the final Linear's weight and bias
    for name, p in model.named_parameters():
        if scheme == "bias":
            p.requires_grad_(name.endswith("bias"))
        elif scheme == "full":
            p.requires_grad_(True)
        elif scheme == "last":
            p.requires_grad_(name in last)
        elif scheme == "lite":
            p.requires_grad_(".lite." in name or name.endswith("bias"))
        elif scheme == "lora":
            p.requires_grad_(".lora." in name or name in last)


def _partial_scheme(model: nn.Module) -> None:
    """tiny-training-like sparse update: biases + partial-channel weights of two 1x1 convs."""
    _freeze(model, "bias")
    for block in (model[3], model[4]):
        block.conv[0] = PartialChannelUpdate(block.conv[0], torch.tensor([0, 2, 5]))
    model[6] = PartialChannelUpdate(model[6], torch.tensor([1, 7]))


def _param_grads(model: nn.Module) -> dict[str, Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    ("model_name", "scheme"),
    [
        ("convnet", "bias"), ("convnet", "full"), ("convnet", "last"), ("convnet", "partial"),
        ("convnet-lite", "lite"), ("convnet-lite", "full"),
        ("transformer", "bias"), ("transformer", "full"), ("transformer", "last"), ("transformer", "lora"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("mask", ["bit", "byte"])
def test_small_models_match_stock(model_name: str, scheme: str, mask: str, dtype: torch.dtype) -> None:
    if model_name.startswith("convnet"):
        stock = _convnet(lite=model_name.endswith("lite"))
        x = torch.randn(2, 3, 16, 16, dtype=dtype)
    else:
        torch.manual_seed(4)
        stock = _TransformerBlock(lora_rank=4).train()  # dropout on: checks the seeded masks too
        x = torch.randn(3, 6, 16, dtype=dtype)
    if scheme == "partial":
        _partial_scheme(stock)
    else:
        _freeze(stock, scheme)
    stock = stock.to(dtype)
    ours = ops.convert(copy.deepcopy(stock), mask=mask)  # type: ignore[arg-type]
    assert not ops.unsupported_leaves(ours)
    grads = []
    for model in (stock, ours):
        torch.manual_seed(11)
        out = model(x)
        out.backward(torch.ones_like(out) / out.numel())
        grads.append(_param_grads(model))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        a, b = grads[0][name], grads[1][name]
        assert (a is None) == (b is None), name
        if a is not None and scheme == "partial":
            tol = 1e-6 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)
        elif a is not None:
            assert torch.equal(a, b), f"{name}: max diff {(a - b).abs().max().item():.3g}"


def test_small_model_input_gradient_matches_stock() -> None:
    stock = _convnet(lite=True)
    _freeze(stock, "bias")
    ours = ops.convert(copy.deepcopy(stock))
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    _assert_same_grads(stock, ours, x)


def test_residual_adds_and_upsample_keep_nothing() -> None:
    up = nn.Upsample(scale_factor=2, mode="bilinear")
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    assert _saved_bytes(_Wrap(lambda t: up(t) + up(t)), x) == 0


# ------------------------------------------------------------------------------ convert and registry


def test_convert_keeps_names_and_parameter_objects_and_restore_undoes_it() -> None:
    model = _TransformerBlock(lora_rank=2)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    keys = list(model.state_dict())
    out = ops.convert(model)
    assert out is model
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert isinstance(model.qkv, ops.linear.MemorySavingLinear)
    assert isinstance(model.qkv, nn.Linear)  # still a Linear for code that checks types
    ops.restore(model)
    assert type(model.qkv) is nn.Linear and type(model.mlp[1]) is nn.GELU
    assert not any(isinstance(m, MemorySavingModule) for m in model.modules())
    assert all(p is params[n] for n, p in model.named_parameters())
    assert "op_options" not in vars(model.qkv)


def test_convert_walks_every_container_and_leaves_the_original_layer_untouched() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.items = nn.ModuleList([nn.ReLU(), nn.Sequential(nn.Linear(2, 2))])
            self.named = nn.ModuleDict({"act": nn.SiLU(), "norm": nn.LayerNorm(2)})

    model = Holder()
    original = model.items[0]
    ops.convert(model, mask="byte")
    assert type(original) is nn.ReLU and "op_options" not in vars(original)
    assert isinstance(model.items[0], ops.activation.MemorySavingReLU)
    assert model.items[0].op_options.mask == "byte"
    assert isinstance(model.items[1][0], ops.linear.MemorySavingLinear)
    assert isinstance(model.named["act"], ops.activation.MemorySavingSiLU)
    assert isinstance(model.named["norm"], ops.norm.MemorySavingLayerNorm)
    ops.convert(model, mask="bit")  # converting again applies the new options
    assert model.items[0].op_options.mask == "bit"
    assert "mask=bit" in repr(model.items[0])


def test_convert_of_a_single_layer_returns_its_replacement() -> None:
    layer = nn.Conv2d(1, 1, 1)
    new = ops.convert(layer)
    assert isinstance(new, ops.conv.MemorySavingConv2d) and new.weight is layer.weight
    assert type(ops.restore(new)) is nn.Conv2d


def test_user_hooks_survive_conversion() -> None:
    calls = []
    model = nn.Sequential(nn.Linear(2, 2))
    handle = model[0].register_forward_hook(lambda *a: calls.append(1))
    ops.convert(model)
    model(torch.randn(1, 2))
    assert calls == [1]
    handle.remove()
    model(torch.randn(1, 2))
    assert calls == [1]


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ConfigError, match="mask must be one of"):
        ops.convert(nn.ReLU(), mask="nibble")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="compress must be None or 'int8'"):
        ops.convert(nn.ReLU(), compress="int4")  # type: ignore[arg-type]


def test_registry_rejects_duplicates_and_lists_types_on_a_miss() -> None:
    with pytest.raises(ConfigError, match="already registered"):
        ops.register_op(nn.Conv2d, lambda m, o: m)
    with pytest.raises(UnknownNameError, match="Conv2d") as info:
        ops.find_op(nn.ConvTranspose2d)
    assert "ConvTranspose2d" in str(info.value) and "'ReLU6'" in str(info.value)
    assert nn.ReLU6 in ops.supported_types()
    with pytest.raises(ConfigError, match=r"nn\.Module subclass"):
        ops.register_op(int, lambda m, o: m)  # type: ignore[arg-type]


def test_register_op_adds_a_type_and_replace_overrides() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(1))

        def forward(self, x: Tensor) -> Tensor:
            return x * self.gamma

    model = nn.Sequential(nn.Linear(2, 2), Scale())
    assert ops.unsupported_leaves(model) == {"1": "Scale"}
    ops.register_op(Scale, lambda m, options: m)
    try:
        assert ops.unsupported_leaves(model) == {}
        ops.register_op(Scale, lambda m, options: m, replace=True)
    finally:
        from ondevice.ops import registry

        registry._REGISTRY.pop(Scale)


def test_unsupported_leaves_lists_modules_with_parameters_and_optionally_parameter_free_ones() -> None:
    class Gate(nn.Module):  # a parameter of its own plus a supported child
        def __init__(self) -> None:
            super().__init__()
            self.alpha = nn.Parameter(torch.zeros(1))
            self.fc = nn.Linear(2, 2)

    class MyConv(nn.Conv2d):  # keeps Conv2d's forward: gets Conv2d's op
        def describe(self) -> str:
            return "mine"

    class OwnConv(nn.Conv2d):  # its own forward may compute something else: never replaced silently
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 2

    model = nn.Sequential(
        nn.Embedding(5, 2), Gate(), MyConv(1, 1, 1), nn.Softmax(-1), nn.Flatten(), nn.Identity(),
        PartialChannelUpdate(nn.Linear(3, 3), torch.tensor([0])), OwnConv(1, 1, 1),
    )  # fmt: skip
    assert ops.unsupported_leaves(model) == {"1": "Gate", "7": "OwnConv"}
    assert ops.unsupported_leaves(model, include_parameterless=True) == {
        "1": "Gate", "3": "Softmax", "7": "OwnConv",
    }  # fmt: skip
    assert "own" in ops.op_support(model[7]).reason and "OwnConv.forward" in ops.op_support(model[7]).reason
    assert ops.op_support(model[2]).supported and "Conv2d" in ops.op_support(model[2]).reason
    ops.convert(model)
    assert type(model[7]) is OwnConv
    assert isinstance(model[2], ops.conv.MemorySavingConv2d) and isinstance(model[2], MyConv)
    assert model[2].describe() == "mine"
    assert type(ops.restore(model)[2]) is MyConv
    assert isinstance(model[6], PartialChannelUpdate) and type(model[6].base) is nn.Linear


def test_a_subclass_keeping_the_parent_forward_gets_the_parent_op_and_stays_its_class() -> None:
    class MyConv(nn.Conv2d):
        pass

    class OwnConvForward(nn.Conv2d):  # overrides a method the conv op mirrors
        def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
            return super()._conv_forward(x, weight * 2, bias)

    layer = MyConv(2, 3, 3, padding=1)
    keys = list(layer.state_dict())
    new = ops.convert(layer)
    assert isinstance(new, MyConv) and isinstance(new, ops.conv.MemorySavingConv2d)
    assert type(new).__name__ == "MemorySavingMyConv" and list(new.state_dict()) == keys
    assert type(ops.convert(MyConv(1, 1, 1))) is type(new)  # one twin class per layer class
    assert type(ops.restore(new)) is MyConv
    layer.weight.requires_grad_(False)
    _assert_same_grads(layer, new, torch.randn(2, 2, 5, 5, requires_grad=True))
    assert not ops.op_support(OwnConvForward).supported
    with pytest.raises(ConfigError, match=r"overrides OwnConvForward\._conv_forward"):
        ops.conv.MemorySavingConv2d.from_module(OwnConvForward(1, 1, 1), ops.OpOptions())


def test_ops_run_on_fake_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = _convnet(lite=True)
    _freeze(model, "bias")
    ops.convert(model)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = model(torch.empty(2, 3, 16, 16))
        out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    for p in model.parameters():
        p.grad = None


# ------------------------------------------------------------------------ in-place activations in Sequential


class _Stack(nn.Module):
    """A model whose child Sequential has conv -> BN -> ReLU6, conv -> BN -> LeakyReLU and conv -> ReLU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU6(),
            nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(6), nn.LeakyReLU(0.1),
            nn.Conv2d(6, 4, 1), nn.ReLU(),
        )  # fmt: skip
        for m in self.body.modules():
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2)
                    m.bias.uniform_(-0.5, 0.5)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class _NormStack(nn.Module):
    """conv -> GroupNorm -> ReLU (a lite-residual branch), then Linear -> ReLU and LayerNorm -> ReLU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.branch = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.GroupNorm(2, 4), nn.ReLU())
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 8), nn.ReLU(), nn.LayerNorm(8), nn.ReLU())
        for norm in (self.branch[1], self.mlp[3]):
            with torch.no_grad():
                norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.branch(x))


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scheme", ["bias", "full", "last"])
@pytest.mark.parametrize("mask", ["bit", "byte"])
@pytest.mark.parametrize("input_grad", [False, True])
def test_sequential_runs_activations_in_place_with_stock_outputs_and_gradients(
    scheme: str, mask: str, input_grad: bool
) -> None:
    stock = _Stack()
    _freeze(stock, scheme)
    ours = ops.convert(copy.deepcopy(stock), mask=mask)  # type: ignore[arg-type]
    assert type(ours.body) is ops.MemorySavingSequential
    assert ops.sequential.inplace_pairs(ours.body) == (2, 5, 7)
    assert list(ours.state_dict()) == list(stock.state_dict())
    x = _special_values(torch.randn(2, 3, 8, 8) * 3).requires_grad_(input_grad)
    _assert_same_grads(stock, ours, x)
    with _OpNames() as seen:
        out = ours(x)
    assert {"hardtanh_", "leaky_relu_", "relu_"} <= set(seen.names)
    assert not {"hardtanh", "leaky_relu", "relu"} & set(seen.names)
    # Frozen conv -> eval BatchNorm (-> ReLU6) runs as one op wherever a frozen conv's output needs a grad.
    fused = sum(name == "_ConvBatchNormFnBackward" for name in _graph_nodes(out))
    assert fused == {"bias": 2, "full": 0, "last": 0}[scheme] + (scheme == "last" and input_grad) * 2


def _graph_nodes(t: Tensor) -> list[str]:
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("scheme", ["bias", "full", "last"])
def test_activations_after_group_norm_layer_norm_and_linear_run_in_place(scheme: str) -> None:
    stock = _NormStack()
    _freeze(stock, scheme)
    ours = ops.convert(copy.deepcopy(stock), mask="byte")
    assert ops.sequential.inplace_pairs(ours.branch) == (2,)
    assert ops.sequential.inplace_pairs(ours.mlp) == (2, 4)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    _assert_same_grads(stock, ours, x)
    with _OpNames() as seen:
        ours(x)
    assert seen.names.count("relu_") == 3 and "relu" not in seen.names


def test_sequential_keeps_what_the_out_of_place_layers_keep() -> None:
    model = _Stack()
    _freeze(model, "bias")
    ours = ops.convert(copy.deepcopy(model), mask="bit")
    x = torch.randn(2, 3, 8, 8)
    plain = copy.deepcopy(ours)
    plain.body = ours.body.to_stock()  # the same memory-saving layers, run out of place
    assert type(plain.body) is nn.Sequential
    masks = 2 * math.ceil(2 * 6 * 8 * 8 / 8) + math.ceil(2 * 4 * 8 * 8 / 8)  # ReLU6, LeakyReLU, ReLU
    assert _saved_bytes(ours, x) == _saved_bytes(plain, x) == masks


@pytest.mark.parametrize("where", ["producer", "activation", "global"])
def test_hooks_turn_in_place_activations_off(where: str) -> None:
    model = _Stack()
    _freeze(model, "bias")
    ours = ops.convert(copy.deepcopy(model))
    seen: list[Tensor] = []
    if where == "producer":
        handle = ours.body[1].register_forward_hook(lambda m, a, out: seen.append(out))
    elif where == "activation":
        handle = ours.body[2].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    else:
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, a, out: seen.append(out) if m is ours.body[1] else None
        )
    x = torch.randn(2, 3, 8, 8)
    try:
        out = ours(x)
    finally:
        handle.remove()
    assert torch.equal(out, model(x))
    assert torch.equal(seen[0], model.body[1](model.body[0](x)))  # the hook's tensor was not clamped
    assert seen[0].data_ptr() != ours.body[2](seen[0]).data_ptr()


def test_restore_turns_sequentials_back_and_convert_again_updates_their_layers() -> None:
    model = _Stack()
    keys = list(model.state_dict())
    ops.convert(model, mask="byte")
    assert model.body[2].op_options.mask == "byte"
    ops.convert(model, mask="bit")
    assert type(model.body) is ops.MemorySavingSequential and model.body[2].op_options.mask == "bit"
    ops.restore(model)
    assert type(model.body) is nn.Sequential and type(model.body[2]) is nn.ReLU6
    assert not any(isinstance(m, MemorySavingModule) for m in model.modules())
    assert list(model.state_dict()) == keys
    root = ops.convert(nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU()))
    assert type(root) is nn.Sequential  # the root is never replaced (convert changes it in place)
    assert type(ops.restore(ops.MemorySavingSequential(nn.Conv2d(1, 1, 1)))) is nn.Sequential
    nested = ops.convert(nn.Sequential(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)), nn.Flatten()))
    assert type(nested[0]) is ops.MemorySavingSequential  # a conv -> BatchNorm run alone qualifies
    assert ops.sequential.fusable_runs(nested[0]) == (0,)


def test_a_channels_last_input_runs_the_separate_layers() -> None:
    model = _Stack()
    _freeze(model, "bias")
    ours = ops.convert(model)
    plain = copy.deepcopy(ours)
    plain.body = plain.body.to_stock()
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    out = ours(x)
    assert "_ConvBatchNormFnBackward" not in _graph_nodes(out)
    _assert_same_grads(plain, ours, x)


def test_replacing_a_child_after_a_forward_changes_what_runs() -> None:
    """The per-Sequential plan is cached by child identity: a replaced child is seen at the next call."""
    model = _Stack()
    _freeze(model, "bias")
    ours = ops.convert(copy.deepcopy(model))
    x = torch.randn(2, 3, 8, 8)
    assert "_ConvBatchNormFnBackward" in _graph_nodes(ours(x))
    ours.body[2] = nn.Identity()  # the first ReLU6 goes: conv -> BN still fuse, nothing clamps
    model.body[2] = nn.Identity()
    _assert_same_grads(model, ours, x.clone().requires_grad_())
    ours.body[1] = nn.Identity()  # no BatchNorm after the first conv any more: no fusion there
    model.body[1] = nn.Identity()
    out = ours(x)
    assert torch.equal(out, model(x))
    assert _graph_nodes(out).count("_ConvBatchNormFnBackward") == 1  # only the depthwise conv -> BN


class _TokenHead(nn.Module):
    """A frozen body and a head on the first token, as ViT classifiers call theirs (``hidden[:, 0]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x)[:, 0])


def test_a_trained_linear_on_a_view_keeps_the_view_not_the_storage_behind_it() -> None:
    import memory
    import ondevice

    torch.manual_seed(0)
    net, x, y = _TokenHead(), torch.randn(4, 33, 16), torch.tensor([0, 1, 2, 0])
    reports, grads = {}, {}
    for saving in (False, True):
        prepared = ondevice.prepare(net, "last_layer", memory_saving=saving)
        reports[saving] = memory.measure(prepared, x, target=y)
        prepared.model.zero_grad()
        nn.functional.cross_entropy(prepared(x), y).backward()
        grads[saving] = prepared.model.head.weight.grad.clone()
    assert torch.equal(grads[True], grads[False])  # the same values, so the same gradient bit for bit
    assert reports[False].activation_bytes == 4 * 33 * 16 * 4  # stock: the whole body output, for one token
    assert reports[True].activation_bytes == 4 * 16 * 4


def test_a_cpu_placeholder_reads_as_zeros_in_its_input_layout() -> None:
    """A convolution's oneDNN backward reads its input to compute the weight gradient even when only the
    bias's is asked for: leftover memory there could hold denormals (several times slower), zeros cannot."""
    from ondevice.ops.placeholder import allocating_placeholder, shape_placeholder

    like = torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last)
    scratch = torch.full((2, 3, 5, 7), 1e-40)  # denormal leftovers the allocator might hand out again
    del scratch
    stand_in = shape_placeholder(like.shape, like, torch.channels_last)
    assert not allocating_placeholder()
    assert stand_in.shape == like.shape and stand_in.stride() == like.stride()
    assert stand_in.dtype == like.dtype
    assert torch.equal(stand_in, torch.zeros_like(like))
