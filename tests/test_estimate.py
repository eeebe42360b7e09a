"""memory.estimate: the fake-tensor step agrees with the real one (memory.measure) within 2 %."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memory
import ondevice
from memory import Budget, budget_bytes_needed
from memory.estimate import OptimizerSpec
from ondevice.errors import ConfigError
from ondevice.models import create_model
from ondevice.optim import build_optimizer, resolve_optimizer

TOLERANCE = 0.02

_ZOO = {
    "mobilenetv2": {"width_mult": 0.35, "resolution": 48},
    "mcunet": {"width_mult": 0.35, "resolution": 48},
    "cnn": {},
    "cnn1d": {},
    "vit": {},
}
_SCHEMES: dict[str, tuple[str, ...]] = {
    "mobilenetv2": ("full", "last_layer", "bias", "lite_residual", "sparse"),
    "mcunet": ("full", "last_layer", "bias", "lite_residual", "sparse"),
    "cnn": ("full", "last_layer", "bias", "lite_residual", "sparse"),
    "cnn1d": ("full", "last_layer", "bias", "lite_residual", "sparse"),
    # no lite_residual: its only convolution is the patch embedding, and the scheme refuses it
    "vit": ("full", "last_layer", "bias", "sparse", "lora"),
}
_HEAVY = {"mobilenetv2", "mcunet", "vit"}  # > 5 s per case on 2 shared cores: marked slow
_CASES = [
    pytest.param(name, scheme, marks=[pytest.mark.slow] if name in _HEAVY else [])
    for name, schemes in _SCHEMES.items()
    for scheme in schemes
]
_MODELS: dict[str, nn.Module] = {}


def _zoo(name: str) -> nn.Module:
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = create_model(name, num_classes=10, **_ZOO[name])
    return _MODELS[name]


def _assert_close(estimated: memory.MemoryReport, measured: memory.MemoryReport) -> None:
    assert estimated.source == "estimated"
    for field in ("activation_bytes", "peak_bytes"):
        est, real = getattr(estimated, field), getattr(measured, field)
        assert abs(est - real) <= TOLERANCE * real, f"{field}: estimated {est}, measured {real}"
    for field in ("param_bytes", "trainable_param_bytes", "gradient_bytes", "optimizer_state_bytes"):
        assert getattr(estimated, field) == getattr(measured, field), field


@pytest.fixture(scope="module", autouse=True)
def _warm_up() -> None:
    # The first real step of a process may build cached lookup tables inside the tracked step; warm up
    # once so that every measurement below sees the steady state a device would.
    model = ondevice.prepare(_zoo("cnn"), "bias")
    memory.measure(model, torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize(("name", "scheme"), _CASES)
def test_estimate_matches_measure_on_the_zoo(name: str, scheme: str) -> None:
    model = ondevice.prepare(_zoo(name), scheme)
    sample = model.model.input_shape
    for batch_size in (1, 4, 8):
        measured = memory.measure(model, torch.randn(batch_size, *sample))
        estimated = memory.estimate(model, batch_size=batch_size)
        _assert_close(estimated, measured)
        assert estimated.modules == measured.modules


def _stack(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 5))
    if kind == "conv":
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
        )  # fmt: skip
    return nn.Sequential(
        nn.Conv1d(2, 8, 5, padding=2), nn.GroupNorm(2, 8), nn.SiLU(), nn.MaxPool1d(2),
        nn.Conv1d(8, 8, 3, padding=1), nn.LeakyReLU(0.1), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        nn.Linear(8, 3),
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["mlp", "conv", "conv1d"])
@pytest.mark.parametrize("scheme", ["full", "bias", "sparse"])
@pytest.mark.parametrize("memory_saving", [True, False])
def test_estimate_matches_measure_on_hand_built_stacks(kind: str, scheme: str, memory_saving: bool) -> None:
    model = ondevice.prepare(_stack(kind), scheme, memory_saving=memory_saving).model
    shape = {"mlp": (20,), "conv": (3, 12, 12), "conv1d": (2, 32)}[kind]
    for batch_size in (1, 4, 8):
        measured = memory.measure(model, torch.randn(batch_size, *shape))
        _assert_close(memory.estimate(model, shape, batch_size=batch_size), measured)


@pytest.mark.parametrize("spec", ["adam", "torch.optim.Adam"])
def test_estimate_with_adam_target_and_full_batch_shape(spec: str) -> None:
    # "adam" is the SDK's own Adam (LeanAdam on CPU, as the Trainer steps); a factory is stepped as given.
    # Their peaks differ (LeanAdam allocates less in its step), so each is compared with its own measure.
    model = ondevice.prepare(_stack("mlp"), "full").model
    params = [p for p in model.parameters() if p.requires_grad]
    if spec == "adam":
        optimizer = build_optimizer(resolve_optimizer("adam"), params)
        estimate_spec: OptimizerSpec = "adam"
    else:
        optimizer, estimate_spec = torch.optim.Adam(params), torch.optim.Adam
    measured = memory.measure(
        model,
        torch.randn(6, 20),
        target=torch.randn(6, 5),
        optimizer=optimizer,
        loss_fn=nn.functional.mse_loss,
    )
    estimated = memory.estimate(
        model, (6, 20), target=torch.empty(6, 5), optimizer=estimate_spec, loss_fn=nn.functional.mse_loss
    )
    _assert_close(estimated, measured)
    assert memory.estimate(model, (6, 20), optimizer=estimate_spec).optimizer_state_bytes == (
        measured.optimizer_state_bytes
    )


def test_estimate_leaves_the_model_alone_and_scales_to_big_inputs() -> None:
    model = ondevice.prepare(
        create_model("mobilenetv2", width_mult=0.35, resolution=32, num_classes=10), "bias"
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # 2048 x 2048 px, batch 64: hundreds of GiB of activations if it were computed.
    report = memory.estimate(model, (3, 2048, 2048), batch_size=64)
    assert report.peak_bytes > 4 * 1024**3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(p) is nn.Parameter and p.grad is None for p in model.parameters())


def test_int8_frozen_weights_and_budget_accounting() -> None:
    model = ondevice.prepare(_zoo("cnn"), "bias")
    float_report = memory.estimate(model, batch_size=2)
    int8 = memory.estimate(model, batch_size=2, frozen_param_bits=8)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert float_report.frozen_param_bytes == 4 * sum(p.numel() for p in frozen)
    # At 8 bits the step is that of the int8-held model: each frozen layer weight one byte per element
    # plus a float32 scale per output channel; the frozen norm parameters stay float32.
    held = ondevice.prepare(_zoo("cnn"), "bias", frozen_weights="int8")
    layer_weights = {f"{name}.weight" for name in held.int8_layers}
    expected = sum(
        p.numel() + 4 * p.shape[0] if name in layer_weights else 4 * p.numel()
        for name, p in model.model.named_parameters()
        if not p.requires_grad
    )
    assert int8.frozen_param_bytes == expected and int8.frozen_param_bits == 8
    assert int8.frozen_param_bytes < 0.3 * float_report.frozen_param_bytes
    assert int8.activation_bytes == float_report.activation_bytes
    trainable = int8.activation_bytes + int8.trainable_param_bytes + int8.gradient_bytes
    trainable += int8.optimizer_state_bytes
    mcu = Budget(10**6, count_frozen_params=False)
    board = Budget(10**6, count_frozen_params=True, frozen_param_bits=8)
    assert budget_bytes_needed(int8, mcu) == trainable
    assert budget_bytes_needed(int8, board) == trainable + expected
    assert int8.needed_bytes(Budget(10**6, count_frozen_params=True)) == trainable + 4 * expected
    assert int8.fits(Budget(trainable)) and not int8.fits(Budget(trainable - 1))
    assert memory.MemoryReport.from_dict(int8.to_dict()) == int8
    assert "frozen parameters at 8 bit" in int8.to_markdown()


@pytest.mark.parametrize(
    ("name", "kwargs", "scheme"),
    [
        ("mobilenetv2", {"width_mult": 0.35, "resolution": 128, "num_classes": 10}, "bias"),
        ("mobilenetv2", {"width_mult": 0.35, "resolution": 64, "num_classes": 10}, "lite_residual"),
        ("vit", {"num_classes": 10}, "lora"),
        ("cnn", {"num_classes": 10}, "sparse"),
    ],
)
def test_estimate_at_8_bits_is_the_measured_step_of_the_int8_model(
    name: str, kwargs: dict[str, object], scheme: str
) -> None:
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    held = ondevice.prepare(model, scheme, frozen_weights="int8")
    measured = memory.measure(held, torch.randn(8, *held.model.input_shape))
    for subject in (ondevice.prepare(model, scheme), ondevice.prepare(model, scheme).model):
        estimated = memory.estimate(subject, batch_size=8, frozen_param_bits=8)
        for field in ("activation_bytes", "peak_bytes", "frozen_param_bytes", "param_bytes"):
            got, want = getattr(estimated, field), getattr(measured, field)
            assert abs(got - want) <= 0.02 * want, (field, got, want)
        assert estimated.frozen_param_bits == measured.frozen_param_bits == 8


def test_bad_arguments_are_rejected() -> None:
    model = ondevice.prepare(_zoo("cnn"), "bias")
    with pytest.raises(ConfigError, match="frozen_param_bits"):
        memory.estimate(model, frozen_param_bits=4)
    with pytest.raises(ConfigError, match="batch_size"):
        memory.estimate(model, batch_size=0)
    with pytest.raises(ConfigError, match="declares no input_shape"):
        memory.estimate(_stack("mlp"))
    with pytest.raises(ConfigError, match="no parameter of Sequential requires grad"):
        memory.estimate(_stack("mlp").requires_grad_(False), (2, 20))
    with pytest.raises(ConfigError, match="optimizer must be"):
        memory.estimate(model, optimizer=3)  # type: ignore[arg-type]
