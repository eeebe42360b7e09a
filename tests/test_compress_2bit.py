"""2-bit activation derivatives (``compress="2bit"``): constants, exact forward, gradients, kept bytes."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, special
from torch import nn
from torch.nn import functional as F

from memory import estimate, measure
from ondevice import ops
from ondevice.errors import ConfigError
from ondevice.ops._compress import (
    STEP_DERIVATIVES,
    StepDerivative,
    encode_2bit,
    step_codes,
    step_derivative,
    step_grad,
    two_bit_nbytes,
)
from ondevice.ops.convert import compressible_layers, effective_compress


def _phi(x: np.ndarray) -> np.ndarray:
    return np.exp(-x * x / 2) / np.sqrt(2 * np.pi)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(x / 2))


def _gelu_tanh_d(x: np.ndarray) -> np.ndarray:
    k = np.sqrt(2 / np.pi)
    t = np.tanh(k * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)


# The exact derivatives, in numpy (independent of torch's kernels).
DERIVATIVES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gelu": lambda x: 0.5 * (1 + special.erf(x / np.sqrt(2))) + x * _phi(x),
    "gelu_tanh": _gelu_tanh_d,
    "silu": lambda x: _sigmoid(x) * (1 + x * (1 - _sigmoid(x))),
    "hardswish": lambda x: np.where(x < -3, 0.0, np.where(x > 3, 1.0, (2 * x + 3) / 6)),
    "sigmoid": lambda x: _sigmoid(x) * (1 - _sigmoid(x)),
    "tanh": lambda x: 1 - np.tanh(x) ** 2,
}
LAYERS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}
# Cosine similarity to the exact input gradient for N(0, 1) inputs and random upstream gradients: the
# expectation is sqrt(1 - mse / E[f'(X)^2]) (levels are conditional means), 0.984-0.998 here.
MIN_COSINE = {
    "gelu": 0.985,
    "gelu_tanh": 0.985,
    "silu": 0.985,
    "hardswish": 0.978,
    "sigmoid": 0.995,
    "tanh": 0.99,
}


def _edges(step: StepDerivative) -> list[float]:
    return [0.0 if step.on_magnitude else -np.inf, *step.thresholds, np.inf]


def _weight(step: StepDerivative) -> Callable[[float], float]:
    return (lambda x: 2 * _phi(x)) if step.on_magnitude else _phi  # the density of |X| or X


def _mse(d: Callable[[np.ndarray], np.ndarray], step: StepDerivative, levels: list[float]) -> float:
    w, edges = _weight(step), _edges(step)
    return sum(
        integrate.quad(lambda x, level=level: w(x) * (d(x) - level) ** 2, a, b, epsabs=1e-13)[0]
        for a, b, level in zip(edges[:-1], edges[1:], levels, strict=True)
    )


@pytest.mark.parametrize("name", sorted(STEP_DERIVATIVES))
def test_constants_are_the_optimum_they_claim(name: str) -> None:
    """Re-derive: the levels are the conditional means of f', f'(t_i) is the midpoint of its neighbours'
    levels (the two stationarity conditions), and no grid triple of thresholds does better."""
    step, d = STEP_DERIVATIVES[name], DERIVATIVES[name]
    w, edges = _weight(step), _edges(step)
    for a, b, level in zip(edges[:-1], edges[1:], step.levels, strict=True):
        mass = integrate.quad(w, a, b, epsabs=1e-13)[0]
        mean = integrate.quad(lambda x: w(x) * d(x), a, b, epsabs=1e-13)[0] / mass
        assert mean == pytest.approx(level, abs=2e-6)
    for i, threshold in enumerate(step.thresholds):
        assert d(np.float64(threshold)) == pytest.approx((step.levels[i] + step.levels[i + 1]) / 2, abs=2e-6)
    best = _mse(d, step, list(step.levels))
    # Exhaustive search over thresholds on a 0.1 grid (cumulative sums give every triple's error at once).
    lo = 0.0 if step.on_magnitude else -6.0
    xs = np.linspace(lo, 8.0, 70001)
    f, wx = d(xs), _weight(step)(xs) * (xs[1] - xs[0])
    s0, s1, s2 = (np.concatenate([[0.0], np.cumsum(wx * f**k)]) for k in (0, 1, 2))
    idx = np.searchsorted(xs, np.arange(lo + 0.1, 4.0, 0.1))
    i, j, k = np.meshgrid(idx, idx, idx, indexing="ij")
    keep = (i < j) & (j < k)
    i, j, k = i[keep], j[keep], k[keep]

    def seg(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
        return (s2[b] - s2[a]) - (s1[b] - s1[a]) ** 2 / np.maximum(s0[b] - s0[a], 1e-300)

    grid_best = float(np.min(seg(0, i) + seg(i, j) + seg(j, k) + seg(k, xs.size)))
    assert best <= grid_best + 1e-6

    # And a local optimiser started at the constants finds nothing better.
    def objective(t: np.ndarray) -> float:
        trial = StepDerivative(tuple(np.sort(t)), step.levels, step.on_magnitude)  # type: ignore[arg-type]
        edges_t, w_t = _edges(trial), _weight(trial)
        levels = [
            integrate.quad(lambda x: w_t(x) * d(x), a, b)[0] / max(integrate.quad(w_t, a, b)[0], 1e-300)
            for a, b in itertools.pairwise(edges_t)
        ]
        return _mse(d, trial, levels)

    result = optimize.minimize(
        objective,
        np.array(step.thresholds),
        method="Nelder-Mead",
        options={"xatol": 1e-6, "fatol": 1e-12, "maxiter": 200},
    )
    assert result.fun >= best * (1 - 1e-6)  # the constants are rounded to 6 digits


@pytest.mark.parametrize("numel", [1, 3, 4, 5, 1023, 70001])
@pytest.mark.parametrize("name", ["gelu", "sigmoid"])
def test_packing_round_trips_on_every_path(name: str, numel: int) -> None:
    step = STEP_DERIVATIVES[name]
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 2
    packed = encode_2bit(x, step)
    assert packed.dtype == torch.uint8 and packed.numel() == two_bit_nbytes(numel)
    codes = step_codes(x, step)
    unpacked = torch.stack([(packed >> (2 * k)) & 3 for k in range(4)], dim=1).reshape(-1)[:numel]
    assert torch.equal(unpacked, codes)
    grad = torch.randn(numel)
    with torch.no_grad():
        fast = step_grad(grad, packed, step, x.shape)
    with torch.enable_grad():  # the ATen path (double backward, other devices)
        generic = step_grad(grad, packed, step, x.shape)
    assert torch.equal(fast, grad * step_derivative(x, step))
    assert torch.equal(generic, fast)
    if numel > 4:  # the ATen encoder (non-numpy tensors) packs the same bytes
        assert torch.equal(encode_2bit(x.to(torch.bfloat16), step).numel() * 0 + packed, packed)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_forward_exact_backward_is_the_step_derivative(name: str) -> None:
    torch.manual_seed(0)
    layer = ops.convert(LAYERS[name](), compress="2bit")
    x = torch.randn(8, 4096, requires_grad=True)
    grad = torch.randn(8, 4096)
    out = layer(x)
    assert torch.equal(out, LAYERS[name]()(x.detach()))  # the forward is unchanged
    out.backward(grad)
    assert x.grad is not None
    assert torch.equal(x.grad, grad * step_derivative(x.detach(), STEP_DERIVATIVES[name]))
    exact = torch.autograd.grad(LAYERS[name]()(x), x, grad)[0]
    cosine = F.cosine_similarity(x.grad.flatten(), exact.flatten(), dim=0).item()
    assert cosine > MIN_COSINE[name]


@pytest.mark.parametrize("make", [nn.GELU, nn.SiLU])
def test_keeps_two_bits_per_element(make: Callable[[], nn.Module]) -> None:
    layer = nn.Sequential(nn.Linear(64, 64), make())
    layer[0].weight.requires_grad_(False)  # bias-only: the linear keeps nothing
    x = torch.randn(16, 64)
    kept = {}
    for compress in (None, "int8", "2bit"):
        converted = ops.convert(layer, compress=compress)
        kept[compress] = measure(converted, x, loss_fn=lambda out, _: out.square().sum()).activation_bytes
        estimated = estimate(converted, tuple(x.shape), loss_fn=lambda out, _: out.square().sum())
        assert estimated.activation_bytes == kept[compress]
    assert kept[None] == 4 * x.numel()
    assert kept["2bit"] == x.numel() // 4  # 0.25 byte per element


def test_library_activations_get_the_2bit_derivative() -> None:
    activations = pytest.importorskip("transformers.activations")
    x = torch.randn(4, 256, requires_grad=True)
    grad = torch.randn(4, 256)
    for layer, name in (
        (activations.NewGELUActivation(), "gelu_tanh"),
        (activations.GELUActivation(), "gelu"),
    ):
        converted = ops.convert(layer, compress="2bit")
        out = converted(x)
        assert torch.equal(out, layer(x.detach()))
        (got,) = torch.autograd.grad(out, x, grad)
        assert torch.equal(got, grad * step_derivative(x.detach(), STEP_DERIVATIVES[name]))
    # No 2-bit derivative for QuickGELU: it keeps 8 bits, as under "int8".
    quick = ops.convert(activations.QuickGELUActivation(), compress="2bit")
    (got,) = torch.autograd.grad(quick(x), x, grad)
    (int8,) = torch.autograd.grad(ops.convert(activations.QuickGELUActivation(), compress="int8")(x), x, grad)
    assert torch.equal(got, int8)


def test_a_relu_network_says_so_and_changes_nothing() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    net(torch.randn(1, 3, 8, 8))
    assert compressible_layers(net) == ()
    with pytest.warns(UserWarning, match=r"compress='2bit' changes what smooth activations .* nothing is"):
        assert effective_compress(net, "2bit") is None
    assert compressible_layers(nn.Sequential(nn.Linear(2, 2), nn.GELU())) == ("1",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert effective_compress(nn.Sequential(nn.Linear(2, 2), nn.SiLU()), "2bit") == "2bit"


def test_bad_compress_value_is_refused() -> None:
    with pytest.raises(ConfigError, match="compress must be None or 'int8' or '2bit', got 'int4'"):
        ops.convert(nn.GELU(), compress="int4")  # type: ignore[arg-type]
