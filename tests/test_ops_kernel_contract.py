"""What the memory-saving ops hand the ATen batch-norm kernels, checked on CPU against stock autograd.

Two CUDA failures came from arguments the CPU kernels ignore (see ../shared/CUDA.md):

* ``native_batch_norm_backward`` was called with ``save_mean=None``; stock autograd passes the (empty, in
  eval mode) statistics the forward returned, and CUDA's backward asserts they are defined.
* the fused conv-BatchNorm(-ReLU) forward passed one tensor as both ``save_mean`` and ``save_invstd`` of
  ``native_batch_norm.out``; in eval mode CUDA writes the running mean into the first and the inverse
  std into the second, then normalises with both, so the shared buffer gave wrong outputs.

A dispatch mode records every call of those kernels, so these checks run anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ondevice.ops import convert

_BACKWARD = torch.ops.aten.native_batch_norm_backward.default
_FORWARD_OUT = torch.ops.aten.native_batch_norm.out


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in (_BACKWARD, _FORWARD_OUT):
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _block(train_input: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
    with torch.no_grad():
        block[1].running_mean.uniform_(-1, 1)
        block[1].running_var.uniform_(0.5, 2)
    block.eval()
    for name, p in block.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    x = torch.randn(4, 3, 6, 6, requires_grad=train_input)
    return block, x


def _record(model: nn.Module, x: torch.Tensor) -> tuple[_Recorder, torch.Tensor, list[torch.Tensor]]:
    for p in model.parameters():
        p.grad = None  # converted layers share their Parameter objects with the stock ones
    recorder = _Recorder()
    with recorder:
        y = model(x)
        y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return recorder, y.detach(), grads


def _backward_stats(recorder: _Recorder) -> list[tuple[Any, Any]]:
    return [(args[5], args[6]) for func, args, _ in recorder.calls if func is _BACKWARD]


MakeModel = Callable[[nn.Module], nn.Module]


@pytest.mark.parametrize("train_input", [False, True])
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda block: convert(nn.ModuleList([block]))[0], id="fused-sequential"),
        pytest.param(lambda block: convert(nn.ModuleList([block]))[0][1], id="batchnorm-alone"),
    ],
)
def test_batch_norm_backward_gets_defined_statistics_as_from_stock(
    make: MakeModel, train_input: bool
) -> None:
    block, x = _block(train_input)
    stock_recorder, _, _ = _record(block, x)
    stock_stats = _backward_stats(stock_recorder)
    assert stock_stats, "stock autograd calls native_batch_norm_backward here"
    assert all(isinstance(s, torch.Tensor) for pair in stock_stats for s in pair)

    module = make(block)
    if not isinstance(module, nn.Sequential):  # the BatchNorm alone: feed it the conv's output
        conv_out = block[0](x).detach().requires_grad_(train_input)
        recorder, _, _ = _record(module, conv_out)
    else:
        recorder, _, _ = _record(module, x)
    ours = _backward_stats(recorder)
    assert ours, "the memory-saving op calls native_batch_norm_backward"
    for save_mean, save_invstd in ours:
        assert isinstance(save_mean, torch.Tensor) and isinstance(save_invstd, torch.Tensor), (
            "save_mean/save_invstd must be defined tensors, as stock passes them (CUDA asserts it)"
        )


def test_fused_forward_gives_each_statistic_its_own_buffer_and_matches_stock() -> None:
    block, x = _block(train_input=True)
    _, stock_y, stock_grads = _record(block, x)
    fused = convert(nn.ModuleList([block]))[0]
    recorder, y, grads = _record(fused, x)
    outs = [kwargs for func, _, kwargs in recorder.calls if func is _FORWARD_OUT]
    assert outs, "the fused conv-BatchNorm-ReLU6 op ran (no fusion, nothing checked)"
    for kwargs in outs:
        save_mean, save_invstd = kwargs["save_mean"], kwargs["save_invstd"]
        assert save_mean.untyped_storage().data_ptr() != save_invstd.untyped_storage().data_ptr() or (
            save_mean.untyped_storage().nbytes() == 0 and save_invstd is not save_mean
        ), "save_mean and save_invstd share one buffer: CUDA's eval kernel writes both, then reads both"
        assert save_mean is not save_invstd
    torch.testing.assert_close(y, stock_y, rtol=0, atol=0)
    for ours, stock in zip(grads, stock_grads, strict=True):
        torch.testing.assert_close(ours, stock, rtol=0, atol=0)
