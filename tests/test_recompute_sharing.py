"""What a recomputed block shares and skips, and attention's float16 copies under a lossy compress mode.

* A LayerNorm under ``share_norm_output`` keeps its output and ``1/std`` instead of its input, with stock
  LayerNorm's gradients (reference: ``F.layer_norm`` on stock autograd), and keeps its input where the
  output would not give it back (a zero scale, a huge shift) or where the input is kept anyway.
* A recomputed block's recomputation stops at the last tensor its backward needs: on a post-norm block
  (BERT's) it runs neither the feed-forward's second projection nor the closing norm again, counted by
  ``memory.flops.FlopCount`` against a full forward of the block, with stock gradients.
* A LayerNorm whose output a LoRA'd projection keeps (found by ``prepare`` on a fake forward) keeps only
  that and ``1/std``: one norm input less per such norm, measured and estimated alike, stock gradients.
* Under ``compress="2bit"`` attention keeps q, k and v in float16 (half of what the exact lean attention
  keeps, measured), close to exact gradients; values beyond float16's range stay float32.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import memory
import ondevice
from bench.library_models import LIBRARY_MODELS, library_available, logits_of
from memory.flops import FlopCount
from ondevice.ops import convert
from ondevice.ops.norm import output_recovers_input, share_norm_output
from ondevice.ops.sdpa import lean_sdpa

needs_transformers = pytest.mark.skipif(not library_available("transformers"), reason="needs transformers")


def _saved(fn: object, *args: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)  # type: ignore[operator]
    return out, kept


@pytest.mark.parametrize("bias", [True, False])
def test_a_shared_layer_norm_keeps_its_output_with_stock_gradients(bias: bool) -> None:
    torch.manual_seed(0)
    norm = nn.LayerNorm(24, bias=bias)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        if bias:
            norm.bias.normal_()
    ours = convert(norm)
    x = torch.randn(3, 5, 24, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_(True)
    grad = torch.randn(3, 5, 24)
    with share_norm_output():
        out, kept = _saved(ours, x)
    assert any(t is out or t.data_ptr() == out.data_ptr() for t in kept)  # the output itself
    assert not any(t.data_ptr() == x.data_ptr() for t in kept)  # not the input
    out.backward(grad)
    assert isinstance(norm.weight, torch.Tensor)
    ref = F.layer_norm(ref_x, (24,), norm.weight, norm.bias, norm.eps)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)


def test_a_shared_layer_norm_keeps_its_input_where_the_output_would_not_give_it_back() -> None:
    x = torch.randn(2, 8, requires_grad=True)
    zero_scale = torch.ones(8)
    zero_scale[3] = 0.0
    assert not output_recovers_input(x, zero_scale, torch.zeros(8))
    assert not output_recovers_input(x, torch.full((8,), 1e-4), torch.ones(8))  # shift 1e4 scales
    assert output_recovers_input(x, torch.full((8,), 0.5), torch.ones(8))
    norm = convert(nn.LayerNorm(8))
    assert isinstance(norm, nn.LayerNorm)
    with torch.no_grad():
        norm.weight.copy_(zero_scale)
    with share_norm_output():
        out, kept = _saved(norm, x)
    assert any(t.data_ptr() == x.data_ptr() for t in kept)
    # an input kept anyway (a recomputed block's) is kept rather than the output
    norm = convert(nn.LayerNorm(8))
    with share_norm_output([x]):
        out, kept = _saved(norm, x)
    assert any(t.data_ptr() == x.data_ptr() for t in kept)
    assert not any(t.data_ptr() == out.data_ptr() for t in kept)


def _loss(output: object, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_of(output), target)


def _grads(prepared: ondevice.PreparedModel) -> dict[str, torch.Tensor]:
    grads = {n: p.grad for n, p in prepared.trainable_parameters().items()}
    return {n: g for n, g in grads.items() if g is not None}


def _quiet(model: nn.Module, **kwargs: object) -> ondevice.PreparedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ondevice.prepare(model, "bias", **kwargs)  # type: ignore[arg-type]


@needs_transformers
def test_a_post_norm_block_is_recomputed_up_to_its_last_needed_tensor_only() -> None:
    spec = LIBRARY_MODELS["transformers/bert"]
    model: Any = spec.build(seed=0)
    x, y = spec.example(4), spec.targets(4)
    stock = _quiet(model, memory_saving=False)
    ours = _quiet(model, recompute=True)
    flops: dict[str, int] = {}
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for label, prepared in (("stock", stock), ("recompute", ours)):
        prepared.train()
        with FlopCount() as count:
            _loss(prepared(x), y).backward()
        flops[label] = count.total
        grads[label] = _grads(prepared)
    block: Any = ours.model.get_submodule("bert.encoder.layer.0")
    hidden = torch.randn(4, spec.sequence, model.config.hidden_size)
    with torch.no_grad(), FlopCount() as one:
        block(hidden)
    layers = model.config.num_hidden_layers
    extra = flops["recompute"] - flops["stock"]
    # the feed-forward's second projection (intermediate -> hidden) is not run again
    second = 2 * 4 * spec.sequence * model.config.intermediate_size * model.config.hidden_size
    assert extra == layers * (one.total - second)
    largest = max(g.abs().max().item() for g in grads["stock"].values())
    for name, grad in grads["stock"].items():
        scale = max(grad.abs().max().item(), 1e-3 * largest)
        torch.testing.assert_close(grads["recompute"][name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


@needs_transformers
@pytest.mark.parametrize("name", ["transformers/bert", "transformers/vit"])
def test_two_bit_attention_keeps_q_k_v_in_half_with_close_gradients(name: str) -> None:
    spec = LIBRARY_MODELS[name]
    model = spec.build(seed=0)
    x, y = spec.example(4), spec.targets(4)
    reports: dict[str, memory.MemoryReport] = {}
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for label, kwargs in (("stock", {"memory_saving": False}), ("exact", {}), ("2bit", {"compress": "2bit"})):
        prepared = _quiet(model, **kwargs)
        reports[label] = memory.measure(prepared, x, target=y, loss_fn=_loss)
        prepared.zero_grad(set_to_none=True)
        _loss(prepared(x), y).backward()
        grads[label] = _grads(prepared)
        estimated = memory.estimate(prepared, tuple(x.shape), dtype=x.dtype, target=y, loss_fn=_loss)
        assert estimated.activation_bytes == reports[label].activation_bytes
    exact = reports["exact"].modules
    names = [f"model.{n}" for n, m in model.named_modules() if type(m).__name__.endswith("Attention")]
    attention = [n for n in names if exact.get(n, 0) > 0]  # the modules whose SDPA keeps q, k, v
    assert attention
    for key in attention:  # float16 q, k, v: half the exact lean attention's bytes
        assert 2 * reports["2bit"].modules[key] == reports["exact"].modules[key]
    assert reports["stock"].activation_bytes >= 1.8 * reports["2bit"].activation_bytes
    # the attention's own parameters (not a key's bias: its gradient is exactly zero, rounding noise here)
    largest = max(g.norm().item() for g in grads["exact"].values())
    for param, grad in grads["exact"].items():
        if ".attention." in param and grad.norm() > 1e-3 * largest:
            error = (grads["2bit"][param] - grad).norm() / grad.norm()
            assert error < 0.3, (param, error)  # measured: 0.07 (BERT), 0.15 (ViT)


def test_values_beyond_half_range_stay_float32() -> None:
    torch.manual_seed(0)
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    k = torch.randn(1, 2, 16, 8, requires_grad=True)
    v = (torch.randn(1, 2, 16, 8) * 1e5).requires_grad_(True)  # beyond float16's 65504
    out, kept = _saved(lambda a, b, c: lean_sdpa(a, b, c, half=True), q, k, v)
    assert out is not None
    dtypes = [t.dtype for t in kept if t is not None and t.dim() == 4]
    assert dtypes == [torch.float16, torch.float16, torch.float32]
    grad = torch.randn_like(out)
    out.backward(grad)
    assert v.grad is not None
    ref_q, ref_k, ref_v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    F.scaled_dot_product_attention(ref_q, ref_k, ref_v).backward(grad)
    assert ref_v.grad is not None
    torch.testing.assert_close(v.grad, ref_v.grad, rtol=1e-2, atol=1e-2 * ref_v.grad.abs().max().item())


@needs_transformers
def test_layer_norms_whose_output_lora_keeps_keep_only_that() -> None:
    spec = LIBRARY_MODELS["transformers/vit"]
    model: Any = spec.build(seed=0)
    x, y = spec.example(4), spec.targets(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = ondevice.prepare(model, "lora")
        stock_lora = ondevice.prepare(model, "lora", memory_saving=False)
        bias = ondevice.prepare(model, "bias")
    lora.load_trainable(stock_lora.trainable_tensors())
    shared = [n for n, m in lora.named_modules() if getattr(m, "share_output", False)]
    # the norms before attention and before the MLP: their outputs feed LoRA'd projections
    assert sorted(shared) == [
        f"model.vit.layers.{i}.layernorm_{w}" for i in (0, 1) for w in ("after", "before")
    ]
    assert not any(
        getattr(m, "share_output", False) for m in bias.modules()
    )  # frozen projections keep nothing
    report = memory.measure(lora, x, target=y, loss_fn=_loss)
    assert (
        memory.estimate(lora, tuple(x.shape), target=y, loss_fn=_loss).activation_bytes
        == report.activation_bytes
    )
    for name in shared:
        del lora.get_submodule(name).share_output
    unshared = memory.measure(lora, x, target=y, loss_fn=_loss)
    tokens = 4 * (spec.resolution // model.config.patch_size) ** 2 + 4  # and a class token per sample
    per_norm = tokens * model.config.hidden_size * 4 + tokens * 4  # its input and mean, float32
    # the first norm's input (the frozen embeddings' output) needs no gradient: it keeps nothing either way
    assert unshared.activation_bytes - report.activation_bytes == (len(shared) - 1) * per_norm
    for name in shared:
        lora.get_submodule(name).share_output = True
    grads = {}
    for label, prepared in (("stock", stock_lora), ("shared", lora)):
        prepared.zero_grad(set_to_none=True)
        _loss(prepared(x), y).backward()
        grads[label] = _grads(prepared)
    for name, grad in grads["stock"].items():
        torch.testing.assert_close(
            grads["shared"][name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item()
        )
