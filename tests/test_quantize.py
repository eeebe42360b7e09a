"""Frozen weights held in int8 (``prepare(..., frozen_weights="int8")``), against a float reference.

The reference is the same prepared model with float32 weights equal to the dequantised int8 values: its
gradients must equal the int8 model's (relative 1e-5). Memory is measured (``memory.measure``), never
assumed: the frozen weights shrink to about a quarter, what a step keeps for backward does not change.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import memory
from bench.library_models import LIBRARY_MODELS, library_available, logits_of
from ondevice import CheckpointMismatchError, ConfigError, PreparedModel, Trainer, prepare
from ondevice.models import create_model
from ondevice.quantize import is_int8

ZOO = {
    "mobilenetv2": {"width_mult": 0.35, "resolution": 64, "num_classes": 10},
    "cnn": {"num_classes": 10},
    "vit": {"num_classes": 10},
}
CASES = [("mobilenetv2", "bias"), ("mobilenetv2", "lite_residual"), ("cnn", "sparse"), ("vit", "lora"),
         ("vit", "bias")]  # fmt: skip


def _zoo(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, **ZOO[name])


def _float_twin(prepared: PreparedModel) -> PreparedModel:
    """The same prepared model with float weights equal to the dequantised int8 values."""
    twin = copy.deepcopy(prepared)
    for name in prepared.int8_layers:
        layer = twin.model.get_submodule(name)
        weight = layer.weight.detach().clone()
        layer.__class__ = type(layer).__mro__[1]  # drop the int8 mixin class
        del layer.weight_int8, layer.weight_scale
        layer.weight = nn.Parameter(weight, requires_grad=False)
    twin.int8_layers = ()
    return twin


def _batch(model: PreparedModel, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, *model.model.input_shape, generator=generator)
    return x, torch.randint(0, 10, (n,), generator=generator)


def _grads(model: PreparedModel, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(logits_of(model(x)), y).backward()
    return {name: p.grad.clone() for name, p in model.trainable_parameters().items() if p.grad is not None}


@pytest.mark.parametrize(("model_name", "scheme"), CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_gradients_equal_those_of_the_dequantised_float_model(model_name: str, scheme: str) -> None:
    torch.manual_seed(2)
    ours = prepare(_zoo(model_name), scheme, frozen_weights="int8")
    assert ours.int8_layers and ours.frozen_weights == "int8"
    reference = _float_twin(ours)
    x, y = _batch(ours)
    with torch.no_grad():
        ours.eval(), reference.eval()
        assert torch.equal(ours(x), reference(x))
    got, want = _grads(ours, x, y), _grads(reference, x, y)
    assert set(got) == set(want) and got
    for name, grad in want.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert float((got[name] - grad).abs().max() / scale) <= 1e-5, name
    for name in ours.int8_layers:  # held in int8, never trained
        layer = ours.model.get_submodule(name)
        assert layer.weight_int8.dtype == torch.int8 and not layer.weight_int8.requires_grad


def _weight_bytes(model: nn.Module, names: tuple[str, ...]) -> int:
    total = 0
    for name in names:
        layer = model.get_submodule(name)
        tensors = (layer.weight_int8, layer.weight_scale) if is_int8(layer) else (layer.weight,)
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def _bert() -> nn.Module:
    if not library_available("transformers"):
        pytest.skip("the dev extra's transformers is not installed")
    return LIBRARY_MODELS["transformers/bert"].build(seed=0)


@pytest.mark.parametrize("source", ["mobilenetv2", "vit", "transformers/bert"])
def test_frozen_weights_take_at_most_0_27x_of_float32(source: str) -> None:
    model = _bert() if source == "transformers/bert" else _zoo(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # library layers on stock autograd: not what this checks
        quantised = prepare(model, "bias", frozen_weights="int8")
        floats = prepare(model, "bias")
    names = quantised.int8_layers
    assert names
    ratio = _weight_bytes(quantised.model, names) / _weight_bytes(floats.model, names)
    assert ratio <= 0.27, f"{source}: int8 weights and scales are {ratio:.3f}x of float32"
    if source == "transformers/bert":
        kinds = {type(quantised.model.get_submodule(n)).__mro__[1].__name__ for n in names}
        assert {"Embedding", "Linear"} <= {k.replace("MemorySaving", "") for k in kinds}


def test_a_measured_step_keeps_the_same_activations_and_a_quarter_of_the_frozen_weights() -> None:
    net = _zoo("mobilenetv2")
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(4))
    floats = memory.measure(prepare(net, "bias"), x, target=y)
    int8 = memory.measure(prepare(net, "bias", frozen_weights="int8"), x, target=y)
    assert int8.activation_bytes == floats.activation_bytes > 0  # measure still sees every kept tensor
    assert int8.trainable_param_bytes == floats.trainable_param_bytes
    assert int8.frozen_param_bytes < 0.32 * floats.frozen_param_bytes  # norm scales stay float
    assert int8.peak_bytes < floats.peak_bytes
    estimated = memory.estimate(prepare(net, "bias", frozen_weights="int8"), batch_size=8)
    assert estimated.frozen_param_bytes == int8.frozen_param_bytes
    assert estimated.activation_bytes == int8.activation_bytes


def test_schemes_that_train_weights_keep_those_in_float() -> None:
    prepared = prepare(_zoo("cnn"), {"name": "sparse", "weight_layers": [-1, -2]}, frozen_weights="int8")
    weights = {n: m._parameters.get("weight") for n, m in prepared.model.named_modules()}
    trained = [n for n, w in weights.items() if w is not None and w.requires_grad]
    assert trained and not set(trained) & set(prepared.int8_layers)
    assert prepared.report.to_dict()["int8_layers"] == list(prepared.int8_layers)


def test_training_moves_what_trains_and_never_the_int8_weights() -> None:
    prepared = prepare(_zoo("mobilenetv2"), "bias", frozen_weights="int8")
    frozen = {n: prepared.model.get_submodule(n).weight_int8.clone() for n in prepared.int8_layers}
    before = {n: p.detach().clone() for n, p in prepared.trainable_parameters().items()}
    trainer = Trainer(prepared, optimizer="sgd", lr=0.05)
    x, y = _batch(prepared, 8)
    losses = [trainer.step(x, y).loss for _ in range(5)]
    assert losses[-1] < losses[0]
    assert any(not torch.equal(before[n], p) for n, p in prepared.trainable_parameters().items())
    assert all(torch.equal(frozen[n], prepared.model.get_submodule(n).weight_int8) for n in frozen)


def test_full_and_bad_values_are_refused_with_what_works() -> None:
    with pytest.raises(ConfigError, match=r"every weight of this model trains.*'bias', 'last_layer'"):
        prepare(_zoo("cnn"), "full", frozen_weights="int8")
    with pytest.raises(ConfigError, match=r"frozen_weights must be one of 'float', 'int8', got 'int4'"):
        prepare(_zoo("cnn"), "bias", frozen_weights="int4")  # type: ignore[arg-type]


def test_a_delta_says_which_frozen_weights_it_was_trained_with(tmp_path) -> None:  # type: ignore[no-untyped-def]
    net = _zoo("cnn")
    int8 = prepare(net, "bias", frozen_weights="int8")
    path = int8.save_delta(tmp_path / "int8.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"with 'int8' frozen weights.*holds them as 'float'"):
        prepare(net, "bias").load_delta(path)
    float_path = prepare(net, "bias").save_delta(tmp_path / "float.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"with 'float' frozen weights.*frozen_weights='float'"):
        int8.load_delta(float_path)
    again = prepare(net, "bias", frozen_weights="int8")
    again.load_delta(path)


def test_estimate_at_8_bits_of_bert_is_the_measured_step_of_its_int8_model() -> None:
    spec = LIBRARY_MODELS["transformers/bert"]
    model = _bert()
    ids, labels = spec.example(8), spec.targets(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # library layers on stock autograd: not what this checks
        held = prepare(model, "lora", frozen_weights="int8")
        floats = prepare(model, "lora")

    def loss(output: object, target: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(logits_of(output), labels)

    measured = memory.measure(held, ids, target=labels, loss_fn=loss)
    estimated = memory.estimate(floats, ids.shape, dtype=ids.dtype, frozen_param_bits=8, loss_fn=loss)
    for field in ("activation_bytes", "peak_bytes", "frozen_param_bytes"):
        got, want = getattr(estimated, field), getattr(measured, field)
        assert abs(got - want) <= 0.02 * want, (field, got, want)
    assert measured.frozen_param_bytes < 0.3 * memory.estimate(
        floats, ids.shape, dtype=ids.dtype, loss_fn=loss
    ).frozen_param_bytes


@pytest.mark.parametrize("source", ["vit", "transformers/bert"])
def test_linear_layers_keep_no_float_copy_of_their_int8_weight(source: str) -> None:
    # F.linear saves weight.t(), a view of the dequantised weight: it must be kept as int8 too.
    model = _bert() if source == "transformers/bert" else _zoo(source)
    spec = LIBRARY_MODELS["transformers/bert"]
    x = spec.example(8) if source == "transformers/bert" else torch.randn(8, *model.input_shape)
    y = spec.targets(8) if source == "transformers/bert" else torch.zeros(8, dtype=torch.long)

    def loss(output: object, target: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(logits_of(output), y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # library layers on stock autograd: not what this checks
        reports = [
            memory.measure(prepare(model, "bias", frozen_weights=kind), x, target=y, loss_fn=loss)
            for kind in ("float", "int8")
        ]
    assert reports[1].activation_bytes == reports[0].activation_bytes > 0
    assert reports[1].peak_bytes < reports[0].peak_bytes
