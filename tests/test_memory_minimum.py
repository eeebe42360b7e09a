"""Lite residual and sparse schemes keep within 1.05x of the analytic minimum their gradients need.

The minimum is computed here from first principles, independently of ``ondevice.ops``: forward hooks on
the *stock* prepared model (``memory_saving=False``, plain torch layers, plain ``requires_grad``
freezing) record every layer call with its input and output, and the rules below decide which tensors a
correct backward must keep to produce exactly the gradients the scheme asks for. Bytes are those of the
tensors' dtype (float32 here); a tensor two rules need is kept once (counted by storage).

Rules, with the reasoning (TinyTL, Cai et al. 2020, Sec. 2-3; tiny-training, Lin et al. 2022, Sec. 3.2):

1. No gradient flows into a tensor that does not require grad, i.e. one computed before the first
   trainable tensor: layers there keep NOTHING, ReLUs included.
2. Conv/Linear ``y = W * x + b``: ``dx = W^T * dy`` needs the (parameter) weight, ``db = sum(dy)`` needs
   nothing, ``dW = dy * x`` needs the input. So a layer keeps its input iff its weight trains; frozen
   layers keep nothing. A depthwise/grouped conv is no different. (Every conv here has kernel >= stride,
   so each input element enters ``dW``.)
3. Partial-channel weight update (only ``W[:, S]`` trains): ``dW[:, S] = dy * x[:, S]`` needs only the
   input channels ``S``: ``|S| / C`` of the input. ``dx`` needs the weight only.
4. BatchNorm with running statistics (eval, frozen statistics) is a per-channel affine map:
   ``dx = dy * g / sqrt(var + eps)`` and ``db = sum(dy)`` need no activation; ``dg = sum(dy * x_hat)``
   needs the normalised input (as many elements as the input; ``x_hat`` follows from ``x`` and the
   buffers). So it keeps its input iff its scale trains.
5. BatchNorm with batch statistics (train mode, e.g. the branch norms of ``LiteResidual(norm="batch")``)
   and GroupNorm normalise by statistics of the batch/sample itself, so ``dx = g * rstd * (dy - mean(dy)
   - x_hat * mean(dy * x_hat))`` needs ``x_hat`` and the reciprocal standard deviation of every
   channel/group whenever the input needs a gradient or the scale trains: input-sized ``x_hat`` plus one
   statistic per channel (BatchNorm) or per sample and group (GroupNorm). ``x_hat`` cannot be recovered
   from the output when the scale is zero (the last branch norm) or a ReLU follows, and ``rstd`` cannot be
   recovered from ``x_hat`` (it is scale-free). Only the bias training and no input gradient: nothing.
6. ReLU/ReLU6 on the gradient path (its input requires grad: a trainable tensor lies before it): the
   derivative is 0 or 1, so backward needs exactly one bit per element, ``ceil(numel / 8)`` bytes,
   except for the elements whose value another rule already keeps (its output or its input kept in full
   precision determines the bit), which cost nothing more.
7. Pooling, upsampling (bilinear), residual adds and Flatten are linear maps of fixed shape: nothing.
8. The head Linear is rule 2: its weight trains, so it keeps its input (the pooled features).

Any other layer type fails the test rather than being guessed at.

Nothing is recomputed: a value a backward formula reads is kept, not rebuilt from other kept tensors
(rebuilding a layer's output, as activation checkpointing or InPlace-ABN do, trades compute for memory
and is another scheme). Only a ReLU bit that can be read straight off a kept value counts as free.

The ops are allowed 5 % over the minimum. What they keep on top of it here: GroupNorm and train-mode
BatchNorm keep the mean next to ``rstd`` (stock's layout), and a ReLU whose output (or part of it) a
weight-trained layer keeps in full precision still keeps its whole 1-bit mask, because each op decides
alone at forward time what it keeps.

Gradients: the default ``lite_residual`` and ``sparse`` schemes are compared with stock PyTorch in
``tests/test_prepare.py::test_gradients_equal_stock_pytorch``; the non-default configurations here are
compared below.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn

import memory
import ondevice
from ondevice import ops
from ondevice.adapters import PartialChannelUpdate
from ondevice.ops import MemorySavingModule
from ondevice.schemes import LiteResidual, Scheme, Sparse

TOLERANCE = 1.05


# ----------------------------------------------------------------------------- the analytic minimum


@dataclass
class _Call:
    """One layer call of the stock forward: the layer, its qualified name, input and output."""

    name: str
    module: nn.Module
    x: Tensor
    y: Tensor


@dataclass
class _Kept:
    """A tensor a correct backward keeps, in full (``channels is None``) or only channels ``channels``."""

    tensor: Tensor
    dim: int
    channels: frozenset[int] | None
    owner: str

    @property
    def nbytes(self) -> int:
        t = self.tensor
        total = t.numel() * t.element_size()
        if self.channels is None:
            return total
        return total // t.shape[self.dim] * len(self.channels)


def _key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


@dataclass
class Minimum:
    """The analytic minimum, in bytes, and where it lies (qualified module name -> bytes)."""

    kept: dict[int, _Kept] = field(default_factory=dict)
    statistics: dict[str, int] = field(default_factory=dict)
    masks: dict[str, int] = field(default_factory=dict)

    def keep(self, t: Tensor, owner: str, *, dim: int = 1, channels: frozenset[int] | None = None) -> None:
        old = self.kept.get(_key(t))
        if old is None:
            self.kept[_key(t)] = _Kept(t, dim, channels, owner)
            return
        assert old.tensor.shape == t.shape and old.dim == dim, f"{owner}: one storage kept in two layouts"
        if old.channels is not None:
            old.channels = None if channels is None else old.channels | channels

    def recoverable_channels(self, call: _Call) -> int:
        """How many channels of a ReLU's output are determined by tensors kept for another reason."""
        channels: set[int] = set()
        for t in (call.x, call.y):
            kept = self.kept.get(_key(t))
            if kept is None or kept.tensor.shape != call.y.shape or kept.dim != 1:
                continue
            if kept.channels is None:
                return call.y.shape[1]
            channels |= kept.channels
        return len(channels)

    @property
    def total_bytes(self) -> int:
        return (
            sum(k.nbytes for k in self.kept.values())
            + sum(self.statistics.values())
            + sum(self.masks.values())
        )

    def by_module(self) -> dict[str, int]:
        result: dict[str, int] = {}
        for kept in self.kept.values():
            result[kept.owner] = result.get(kept.owner, 0) + kept.nbytes
        for part in (self.statistics, self.masks):
            for name, nbytes in part.items():
                result[name] = result.get(name, 0) + nbytes
        return result


def _trains(param: Tensor | None) -> bool:
    return param is not None and param.requires_grad


def _conv_or_linear(call: _Call, minimum: Minimum) -> None:  # rules 2 and 8
    if _trains(call.module.weight):
        minimum.keep(call.x, call.name)


def _partial(call: _Call, minimum: Minimum) -> None:  # rule 3
    module = call.module
    assert isinstance(module, PartialChannelUpdate)
    if _trains(module.base.weight):
        minimum.keep(call.x, call.name)
    elif _trains(module.weight_update):
        dim = call.x.dim() - 1 if isinstance(module.base, nn.Linear) else 1
        channels = frozenset(int(c) for c in module.channel_index)
        minimum.keep(call.x, call.name, dim=dim, channels=channels)


def _batch_norm(call: _Call, minimum: Minimum) -> None:  # rules 4 and 5
    module = call.module
    if not module.training:
        if _trains(module.weight):
            minimum.keep(call.x, call.name)
        return
    if call.x.requires_grad or _trains(module.weight):
        minimum.keep(call.x, call.name)
        minimum.statistics[call.name] = call.x.shape[1] * call.x.element_size()


def _group_norm(call: _Call, minimum: Minimum) -> None:  # rule 5
    module = call.module
    assert isinstance(module, nn.GroupNorm)
    if call.x.requires_grad or _trains(module.weight):
        minimum.keep(call.x, call.name)
        minimum.statistics[call.name] = call.x.shape[0] * module.num_groups * call.x.element_size()


def _relu(call: _Call, minimum: Minimum) -> None:  # rule 6, settled once every keep is known
    if call.x.requires_grad:
        minimum.masks[call.name] = -1


def _nothing(call: _Call, minimum: Minimum) -> None:  # rule 7
    """Linear maps of fixed shape keep nothing."""


_RULES: dict[type[nn.Module], Callable[[_Call, Minimum], None]] = {
    nn.Conv2d: _conv_or_linear,
    nn.Linear: _conv_or_linear,
    PartialChannelUpdate: _partial,
    nn.BatchNorm2d: _batch_norm,
    nn.GroupNorm: _group_norm,
    nn.ReLU: _relu,
    nn.ReLU6: _relu,
    nn.AvgPool2d: _nothing,
    nn.AdaptiveAvgPool2d: _nothing,
    nn.Flatten: _nothing,
    nn.Identity: _nothing,
}


def _units(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Leaf layers, and partial-channel wrappers as one layer (their forward calls no child)."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, PartialChannelUpdate):
            inside.append(name)
            yield name, module
        elif next(module.children(), None) is None:
            yield name, module


@contextmanager
def _recording(model: nn.Module) -> Iterator[list[_Call]]:
    calls: list[_Call] = []
    handles = []
    for name, module in _units(model):

        def hook(m: nn.Module, args: tuple[Tensor, ...], out: Tensor, name: str = name) -> None:
            calls.append(_Call(name, m, args[0], out))

        handles.append(module.register_forward_hook(hook))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def analytic_minimum(model: nn.Module, x: Tensor) -> Minimum:
    """The bytes a correct backward of a stock ``model`` must keep on ``x`` (rules 1-8 above).

    ``model`` runs in its current train/eval mode and must hold plain torch layers only.
    """
    assert not any(isinstance(m, MemorySavingModule) for m in model.modules())
    with _recording(model) as calls, torch.enable_grad():
        model(x)
    minimum = Minimum()
    for call in calls:
        rule = _RULES.get(type(call.module))
        if rule is None:
            known = ", ".join(sorted(t.__name__ for t in _RULES))
            pytest.fail(
                f"no minimum rule for {call.name} ({type(call.module).__name__}); rules cover {known}"
            )
        rule(call, minimum)
    for call in calls:
        if call.name in minimum.masks:
            channels = call.y.shape[1]
            free = call.y.numel() // channels * (channels - minimum.recoverable_channels(call))
            minimum.masks[call.name] = math.ceil(free / 8)
    return minimum


# ----------------------------------------------------------------------------- configurations


@functools.cache
def _mobilenetv2(resolution: int) -> nn.Module:
    """MobileNetV2-w0.35 with non-trivial BN statistics and shifts, as a pretrained backbone has."""
    torch.manual_seed(0)
    model = ondevice.create_model("mobilenetv2", width_mult=0.35, resolution=resolution, num_classes=10)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, resolution, resolution))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


# Layer indices of MobileNetV2 (Conv leaves without the head): 0 stem, 1-2 block 1 (no expansion), then
# three per block (expand, depthwise, project): block b starts at 3 * b - 3; index 40 is the stride-2
# depthwise conv of block 14; -1 the final 1x1 conv, -2..-4 block 17's project, depthwise and expand.
SCHEMES: dict[str, Scheme] = {
    "lite_residual": LiteResidual(),
    "lite_residual-batchnorm-nopool": LiteResidual(expand=0.5, kernel_size=3, downsample=1, norm="batch"),
    "lite_residual-pool4-wide-nobias": LiteResidual(expand=2.0, groups=4, downsample=4, train_bias=False),
    "sparse": Sparse(),
    "sparse-partial-depthwise": Sparse(
        bias_last_k=8, weight_layers=(-1, -2, -3, -4, 40), channel_ratios=(0.25, 0.5, 1.0, 0.125, 1.0)
    ),
}
# How many times more stock PyTorch keeps, at least (observed at 64 px / 128 px: 19.7 / 20.4, 8.0 / 8.1,
# 31.3 / 35.5, 40.4 / 59.7, 20.6 / 8.1).
STOCK_FACTOR = {
    "lite_residual": 15,
    "lite_residual-batchnorm-nopool": 6,
    "lite_residual-pool4-wide-nobias": 25,
    "sparse": 30,
    "sparse-partial-depthwise": 6,
}


def _check_minimum(resolution: int, batch: int, scheme_id: str) -> None:
    model = _mobilenetv2(resolution)
    scheme = SCHEMES[scheme_id]
    x = torch.randn(batch, 3, resolution, resolution)
    stock = ondevice.prepare(model, scheme, memory_saving=False)
    minimum = analytic_minimum(stock.train(), x)  # as measure() runs it: frozen BatchNorms stay in eval
    ours = memory.measure(ondevice.prepare(model, scheme), x)
    measured = ours.activation_bytes
    expected = minimum.by_module()
    excess = sorted(
        ((ours.modules.get(n, 0) - expected.get(n, 0), n) for n in {*ours.modules, *expected}), reverse=True
    )
    detail = f"minimum {minimum.total_bytes}, measured {measured}; largest excess by module: {excess[:5]}"
    assert minimum.total_bytes <= measured <= TOLERANCE * minimum.total_bytes, detail
    assert memory.measure(stock, x).activation_bytes > STOCK_FACTOR[scheme_id] * measured


@pytest.mark.parametrize("scheme_id", list(SCHEMES))
def test_activation_bytes_meet_the_analytic_minimum_at_64px(scheme_id: str) -> None:
    _check_minimum(64, 2, scheme_id)


@pytest.mark.slow
@pytest.mark.parametrize("scheme_id", list(SCHEMES))
def test_activation_bytes_meet_the_analytic_minimum_at_128px_batch_8(scheme_id: str) -> None:
    _check_minimum(128, 8, scheme_id)


@pytest.mark.parametrize("scheme_id", [s for s in SCHEMES if s not in ("lite_residual", "sparse")])
def test_gradients_equal_stock_pytorch(scheme_id: str) -> None:
    """The configurations test_prepare does not cover: ops' gradients equal stock PyTorch's to 1e-5."""
    model = _mobilenetv2(64)
    x = torch.randn(2, 3, 64, 64)
    ours = ondevice.prepare(model, SCHEMES[scheme_id])
    stock = ondevice.prepare(model, SCHEMES[scheme_id], memory_saving=False)
    gen = torch.Generator().manual_seed(3)
    values = {  # non-zero values everywhere, the zero-initialised branch norm scales included
        name: p.detach() + 0.1 * torch.randn(p.shape, generator=gen)
        for name, p in ours.trainable_parameters().items()
    }
    grads = []
    for prepared in (ours, stock):
        prepared.load_trainable(values, strict=False)
        out = prepared.train()(x)
        (out * torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)).sum().backward()
        grads.append({name: p.grad for name, p in prepared.trainable_parameters().items()})
    got, want = grads
    assert got.keys() == want.keys()
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        assert float(got[name].abs().sum()) > 0, f"{name} got no gradient"


# ----------------------------------------------------------------------------- the rules themselves


def test_minimum_rules_on_a_hand_counted_stack() -> None:
    """The rules, counted by hand on a small stack; the ops meet the minimum there too."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),  # 0-2: nothing trains yet
        nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),  # 3-5: BN shift trains
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # 6: depthwise, weight trains
        nn.GroupNorm(2, 8), nn.ReLU(),  # 7-8: GroupNorm scale trains
        nn.Conv2d(8, 4, 1),  # 9: 2 of its 8 input channels train
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),  # 10-12: the head trains
    ).eval()  # fmt: skip
    model[9] = PartialChannelUpdate(model[9], torch.tensor([1, 6]))
    trained = {"4.bias", "6.weight", "7.weight", "9.weight_update", "12.weight"}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
    x = torch.randn(2, 3, 6, 6)
    plane = 2 * 6 * 6  # elements per channel
    minimum = analytic_minimum(model, x)
    assert minimum.by_module() == {  # nothing for layers 0-4, before the first trainable tensor (rule 1)
        "5": 0,  # ReLU6 mask: its output is kept in full by the depthwise conv (rule 6)
        "6": 8 * plane * 4,  # the depthwise conv's input (rule 2)
        "7": 8 * plane * 4 + 2 * 2 * 4,  # x_hat and rstd per sample and group (rule 5)
        "8": 6 * plane // 8,  # ReLU mask of the 6 channels the partial layer does not keep (rule 6)
        "9": 2 * plane * 4,  # 2 of 8 input channels (rule 3)
        "12": 2 * 4 * 4,  # the head's input (rule 8)
    }
    measured = memory.measure(ops.convert(model), x).activation_bytes
    assert minimum.total_bytes <= measured <= TOLERANCE * minimum.total_bytes
