"""The code paths the memory-saving ops take on CUDA, checked on CPU with real values.

On plain CPU tensors the ops pack and read masks with numpy; on any other tensor (CUDA, a tensor subclass)
they use elementwise integer arithmetic and ATen's ``threshold_backward``, which CPU tests would otherwise
only reach on fake tensors, without values. And what a backward kernel receives in place of an input it
does not keep must have the input's layout: cuDNN picks its algorithm and the gradient's layout from it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ondevice.ops import convert
from ondevice.ops._bitmask import _pack_arith, _pack_numpy, _unpack_arith, _unpack_table


class Other(torch.Tensor):
    """A tensor subclass with no behaviour of its own: the ops treat it as a non-CPU-numpy tensor."""


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 63, 64, 65, 1001])
def test_arithmetic_packing_equals_numpy_packing(numel: int) -> None:
    generator = torch.Generator().manual_seed(numel)
    mask = torch.rand(numel, generator=generator) > 0.5
    packed = _pack_numpy(mask)
    torch.testing.assert_close(_pack_arith(mask), packed, rtol=0, atol=0)
    for dtype in (torch.uint8, torch.float32):
        torch.testing.assert_close(
            _unpack_arith(packed, numel, dtype), _unpack_table(packed, numel, dtype), rtol=0, atol=0
        )
        assert _unpack_arith(packed, numel, dtype).tolist() == mask.to(dtype).tolist()


@pytest.mark.parametrize("mask", ["bit", "byte"])
@pytest.mark.parametrize("layer", [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1), nn.Hardtanh(-0.5, 0.5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_activations_on_non_numpy_tensors_give_stock_gradients(
    layer: nn.Module, mask: str, channels_last: bool
) -> None:
    x = torch.randn(2, 3, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours = convert(nn.Sequential(layer), mask=mask)  # type: ignore[arg-type]
    results = []
    for module, kind in ((layer, torch.Tensor), (ours, Other)):
        leaf = x.clone().as_subclass(kind).requires_grad_(True)
        out = module(leaf)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        results.append((out.detach().as_subclass(torch.Tensor), leaf.grad.as_subclass(torch.Tensor)))
    (stock_out, stock_grad), (our_out, our_grad) = results
    torch.testing.assert_close(our_out, stock_out, rtol=0, atol=0)
    torch.testing.assert_close(our_grad, stock_grad, rtol=0, atol=0)


_BACKWARDS = {
    torch.ops.aten.convolution_backward.default: 1,
    torch.ops.aten.avg_pool2d_backward.default: 1,
    torch.ops.aten.max_pool2d_with_indices_backward.default: 1,
    torch.ops.aten._adaptive_avg_pool2d_backward.default: 1,
}


class _InputLayouts(TorchDispatchMode):
    """Records the strides of the input each shape-only backward kernel receives, and of its result."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in _BACKWARDS:
            result = out[0] if isinstance(out, tuple | list) else out
            self.seen.append((str(func), tuple(args[_BACKWARDS[func]].stride()), tuple(result.stride())))
        return out


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: nn.Conv2d(4, 6, 3, padding=1), id="conv"),
        pytest.param(lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), id="depthwise"),
        pytest.param(lambda: nn.AvgPool2d(2), id="avgpool"),
        pytest.param(lambda: nn.MaxPool2d(2), id="maxpool"),
        pytest.param(lambda: nn.AdaptiveAvgPool2d(3), id="adaptive-avgpool"),
    ],
)
def test_shape_only_backwards_get_an_input_in_the_inputs_layout(make: Any) -> None:
    torch.manual_seed(0)
    stock = make()
    for param in stock.parameters():
        param.requires_grad_(False)  # frozen: the memory-saving op keeps no input, only its shape
    ours = convert(nn.ModuleList([stock]))[0]
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    records = []
    for module in (stock, ours):
        leaf = x.clone(memory_format=torch.channels_last).requires_grad_(True)
        with _InputLayouts() as recorder:
            module(leaf).square().sum().backward()
        records.append((recorder.seen, leaf.grad))
    (stock_seen, stock_grad), (our_seen, our_grad) = records
    assert stock_seen and our_seen == stock_seen, "the stand-in input must have the real input's strides"
    assert our_grad.stride() == stock_grad.stride()
    torch.testing.assert_close(our_grad, stock_grad, rtol=0, atol=0)
