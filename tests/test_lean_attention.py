"""Attention keeps q, k and v only (ondevice.ops.sdpa): stock gradients bit for bit, the output and the
log-sum-exp no longer kept, measured and estimated alike, and stock behaviour wherever it does not apply."""

from __future__ import annotations

import contextlib
import copy
import math
import pickle
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

import memory
import ondevice
from bench.library_models import LIBRARY_MODELS, library_available, logits_of
from ondevice.ops import restore
from ondevice.ops.sdpa import MemorySavingAttention, attention_callers, lean_sdpa

LIBRARY = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            not library_available(name.split("/")[0]), reason=f"needs {name.split('/')[0]}"
        ),
    )
    for name in ("transformers/vit", "transformers/bert", "transformers/gpt2", "timm/vit_tiny")
]


class _Calls(TorchFunctionMode):
    """Records the query shape of every SDPA call (what stock attention keeps per call follows from it)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[torch.Size, torch.Size, torch.dtype]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is F.scaled_dot_product_attention:
            self.shapes.append((args[0].shape, args[2].shape, args[0].dtype))
        return func(*args, **(kwargs or {}))


def _loss(output: Any, target: Tensor) -> Tensor:
    return F.cross_entropy(logits_of(output), target)


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", LIBRARY)
def test_library_attention_keeps_q_k_v_only_with_stock_gradients(name: str) -> None:
    spec = LIBRARY_MODELS[name]
    net, x, y = spec.build(0), spec.example(4), spec.targets(4)
    stock = ondevice.prepare(net, "bias", memory_saving=False)
    lean = ondevice.prepare(net, "bias")
    callers = attention_callers(net)
    assert callers and all(isinstance(lean.model.get_submodule(n), MemorySavingAttention) for n in callers)
    grads, reports = {}, {}
    calls = _Calls()  # what stock attention is called with
    for label, prepared in (("stock", stock), ("lean", lean)):
        prepared.model.zero_grad()
        with calls if label == "stock" else contextlib.nullcontext():
            _loss(prepared(x), y).backward()
        grads[label] = _grads(prepared.model)
        prepared.model.zero_grad()
        reports[label] = memory.measure(prepared, x, target=y, loss_fn=_loss)
    assert grads["stock"].keys() == grads["lean"].keys()
    if not any(getattr(m, "share_output", False) for m in lean.modules()):
        assert all(torch.equal(grads["stock"][k], grads["lean"][k]) for k in grads["stock"])  # bit for bit
    else:  # a LayerNorm whose output the head keeps keeps only that: its input comes back to float rounding
        largest = max(g.abs().max().item() for g in grads["stock"].values())
        for k, g in grads["stock"].items():
            torch.testing.assert_close(grads["lean"][k], g, rtol=1e-5, atol=1e-6 * largest, msg=k)
    # per call, stock keeps the output (q's rows x v's width) and the log-sum-exp (q's rows, float32) more
    assert calls.shapes
    dropped = sum(
        math.prod(q[:-1]) * v[-1] * dtype.itemsize + math.prod(q[:-1]) * 4 for q, v, dtype in calls.shapes
    )
    kept = {
        label: sum(b for m, b in report.modules.items() if any(m.startswith(f"model.{n}") for n in callers))
        for label, report in reports.items()
    }
    assert kept["stock"] - kept["lean"] == dropped
    estimated = memory.estimate(lean, tuple(x.shape), dtype=x.dtype, target=y, loss_fn=_loss)
    assert estimated.activation_bytes == reports["lean"].activation_bytes


def test_where_it_does_not_apply_stock_attention_runs() -> None:
    q = torch.randn(2, 2, 5, 8, requires_grad=True)
    assert lean_sdpa(q, q, q) is not None
    assert lean_sdpa(q, q, q, dropout_p=0.1) is None  # dropout's random mask is not replayed
    assert lean_sdpa(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool)) is None
    assert lean_sdpa(q.detach(), q.detach(), q.detach()) is None  # no gradient wanted: nothing is kept
    with torch.no_grad():
        assert lean_sdpa(q, q, q) is None


def test_lean_attention_modules_restore_pickle_and_keep_their_state_dict() -> None:
    if not library_available("transformers"):
        pytest.skip("needs transformers")
    net = LIBRARY_MODELS["transformers/bert"].build(0)
    keys = list(net.state_dict())
    classes = {n: type(net.get_submodule(n)) for n in attention_callers(net)}
    prepared = ondevice.prepare(net, "bias")
    converted = {n: prepared.model.get_submodule(n) for n in classes}
    assert all(
        isinstance(m, MemorySavingAttention) and isinstance(m, classes[n]) for n, m in converted.items()
    )
    assert list(prepared.model.state_dict()) == keys
    clone = pickle.loads(pickle.dumps(prepared.model))
    assert all(isinstance(clone.get_submodule(n), MemorySavingAttention) for n in classes)
    back = restore(copy.deepcopy(prepared.model))
    assert all(type(back.get_submodule(n)) is cls for n, cls in classes.items())
