"""memory.measure: saved bytes, peak and state of one training step, checked against hand counts."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import Tensor, nn

import memory
import ondevice
from memory.measure import LiveTensorTracker, SavedTensorTracker, distinct_storage_bytes
from ondevice import ops
from ondevice.errors import ConfigError


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))


def test_mlp_report_matches_hand_count() -> None:
    model = _mlp()
    x = torch.randn(4, 16)
    report = memory.measure(model, x)
    # Stock: Linear 1 keeps x (4x16 floats); ReLU keeps its output (4x32), which Linear 2 keeps too:
    # one storage, counted once. Weights are parameters, not activations.
    assert report.activation_bytes == 4 * 16 * 4 + 4 * 32 * 4
    assert report.modules == {"": 0, "0": 256, "1": 512, "2": 0}
    n_params = sum(p.numel() for p in model.parameters())
    assert report.param_bytes == report.trainable_param_bytes == n_params * 4
    assert report.gradient_bytes == n_params * 4
    assert report.optimizer_state_bytes == n_params * 4  # SGD momentum buffers
    assert report.peak_bytes >= report.param_bytes + report.gradient_bytes + report.optimizer_state_bytes
    assert report.source == "measured"

    ops.convert(model)
    ours = memory.measure(model, x)
    # Both Linear weights train, so both inputs stay; the ReLU keeps a 1-bit mask of 128 elements.
    assert ours.activation_bytes == 4 * 16 * 4 + 4 * 32 * 4 + 128 // 8
    assert ours.modules == {"": 0, "0": 256, "1": 16, "2": 512}


def test_module_breakdown_sums_to_the_total_and_names_modules() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6(), nn.Flatten(), nn.LazyLinear(5))
    model(torch.randn(2, 3, 8, 8))
    report = memory.measure(model, torch.randn(2, 3, 8, 8))
    assert sum(report.modules.values()) == report.activation_bytes
    assert set(report.modules) == {"", "0", "1", "2", "3", "4"}
    assert report.modules["3"] == 0  # Flatten keeps nothing


def test_measure_leaves_the_model_as_it_was() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    before = copy.deepcopy(model.state_dict())
    model[0].weight.grad = torch.ones_like(model[0].weight)
    memory.measure(model, torch.randn(2, 3, 8, 8))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # lr 0, running stats put back
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[0].bias.grad is None


def test_user_optimizer_loss_and_target() -> None:
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    report = memory.measure(
        model, torch.randn(4, 16), target=torch.randn(4, 10), optimizer=opt, loss_fn=nn.functional.mse_loss
    )
    n_params = sum(p.numel() for p in model.parameters())
    # Adam keeps exp_avg and exp_avg_sq per parameter plus a float32 step scalar per parameter tensor.
    assert report.optimizer_state_bytes == 2 * n_params * 4 + 4 * 4


def test_frozen_model_and_non_tensor_output_are_rejected() -> None:
    model = _mlp().requires_grad_(False)
    with pytest.raises(ConfigError, match="no parameter of Sequential requires grad"):
        memory.measure(model, torch.randn(2, 16))

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.fc(x), x

    with pytest.raises(ConfigError, match="pass loss_fn"):
        memory.measure(Pair(), torch.randn(2, 2))


def _conv_bn_relu6_net() -> nn.Module:
    """A small MobileNetV2-like stack with residual adds, in eval mode (frozen BN statistics)."""
    torch.manual_seed(1)

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(c, 3 * c, 1, bias=False), nn.BatchNorm2d(3 * c), nn.ReLU6(),
                nn.Conv2d(3 * c, 3 * c, 3, padding=1, groups=3 * c, bias=False),
                nn.BatchNorm2d(3 * c), nn.ReLU6(),
                nn.Conv2d(3 * c, c, 1, bias=False), nn.BatchNorm2d(c),
            )  # fmt: skip

        def forward(self, x: Tensor) -> Tensor:
            return x + self.body(x)

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        Block(8), Block(8), nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    return model.eval()


def _one_bit_bound(model: nn.Module, x: Tensor) -> int:
    """ceil(numel / 8) bytes per ReLU/ReLU6 output: TinyTL's 1-bit activation bound for bias-only."""
    sizes: list[int] = []
    handles = [
        m.register_forward_hook(lambda m, i, o: sizes.append(o.numel()))
        for m in model.modules()
        if isinstance(m, nn.ReLU | nn.ReLU6)
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return sum(math.ceil(n / 8) for n in sizes)


def test_bias_only_activation_bytes_meet_the_one_bit_bound() -> None:
    model = _conv_bn_relu6_net()
    x = torch.randn(4, 3, 32, 32)
    bound = _one_bit_bound(model, x)
    stock = memory.measure(model, x)
    ours = memory.measure(ops.convert(copy.deepcopy(model)), x)
    assert bound <= ours.activation_bytes <= 1.05 * bound
    assert stock.activation_bytes > 30 * ours.activation_bytes
    assert ours.peak_bytes < stock.peak_bytes
    byte = memory.measure(ops.convert(copy.deepcopy(model), mask="byte"), x)
    assert byte.activation_bytes == 8 * bound  # every ReLU6 output here is a multiple of 8 elements


def test_live_tracker_follows_frees_and_skips_placeholders() -> None:
    from ondevice.ops.placeholder import shape_placeholder

    live = LiveTensorTracker()
    with live:
        placeholder = shape_placeholder((1000,), torch.empty(1))  # uninitialised, never touched
        a = torch.ones(1000)
        b = a[10:].mul_(2)  # in place on a view: no new storage
        c = torch.ones(500)
        del c
        d = torch.ones(250)
    assert placeholder.numel() == 1000 and b.numel() == 990
    assert live.peak_bytes == 4000 + 2000
    assert live.current_bytes == 4000 + 1000
    del a, b, d
    assert live.current_bytes == 0


def test_report_serialises_and_renders() -> None:
    report = memory.measure(_mlp(), torch.randn(4, 16))
    data = json.loads(json.dumps(report.to_dict()))
    assert memory.MemoryReport.from_dict(data) == report
    text = report.to_markdown()
    assert "| activations saved for backward | 768 |" in text
    assert "| 1 | 512 |" in text
    assert report.training_state_bytes == report.trainable_param_bytes * 3
    with pytest.raises(ConfigError, match="activation_bytes must be an int >= 0"):
        memory.MemoryReport(-1, 0, 0, 0, 0, 0)
    with pytest.raises(ConfigError, match="source must be"):
        memory.MemoryReport(0, 0, 0, 0, 0, 0, source="guessed")  # type: ignore[arg-type]


def test_trackers_count_fake_tensors_like_real_ones() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    def step(model: nn.Module, x: Tensor) -> tuple[int, int]:
        saved = SavedTensorTracker(exclude=[*model.parameters(), *model.buffers()])
        live = LiveTensorTracker(known=[*model.parameters(), *model.buffers(), x])
        with live:
            with saved.track(model):
                out = model(x)
            saved_bytes = saved.saved_bytes
            out.sum().backward()
        return saved_bytes, live.peak_bytes

    model = ops.convert(_conv_bn_relu6_net())
    real = step(model, torch.randn(2, 3, 16, 16))
    for p in model.parameters():
        p.grad = None
    fake_model = copy.deepcopy(model)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        for module in fake_model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(mode.from_tensor(p.detach()), p.requires_grad))
            for name, b in list(module.named_buffers(recurse=False)):
                setattr(module, name, mode.from_tensor(b))
        fake = step(fake_model, torch.empty(2, 3, 16, 16))
    assert fake[0] == real[0]
    assert fake[1] > 0


def test_distinct_storage_bytes_counts_views_once() -> None:
    t = torch.zeros(10)
    assert distinct_storage_bytes([t, t[2:], t.view(2, 5), None]) == 40


@pytest.mark.slow
def test_mobilenetv2_bias_only_stock_versus_ondevice() -> None:
    models = pytest.importorskip("ondevice.models")
    model = models.create_model("mobilenetv2", width_mult=0.35, resolution=128).eval()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    x = torch.randn(8, 3, 128, 128)
    bound = _one_bit_bound(model, x)
    stock = memory.measure(model, x)
    ours = memory.measure(ops.convert(model), x)
    assert bound <= ours.activation_bytes <= 1.05 * bound
    assert stock.activation_bytes > 50 * ours.activation_bytes


class _Scale(nn.Module):
    """A parametrised layer with its own forward and no memory-saving op: it runs on stock autograd."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class _Gate(nn.Module):
    """A container with a parameter of its own (allowed by prepare), multiplying its child's output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.scale = nn.Parameter(torch.ones(32))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) * self.scale


def test_layers_without_an_op_are_reported_as_stock_autograd() -> None:
    torch.manual_seed(0)
    model = ops.convert(nn.Sequential(nn.Linear(16, 32), _Scale(32), nn.ReLU(), nn.Linear(32, 10)))
    report = memory.measure(model, torch.randn(4, 16))
    # The stock multiply keeps its 4x32 float input for the weight's gradient; the layers with ops are
    # not listed, however much they keep.
    assert report.stock_modules == {"1": 4 * 32 * 4}
    assert report.stock_bytes == 512 and report.modules["1"] == 512
    text = report.to_markdown()
    assert "layers on stock autograd (no memory-saving op): 512 bytes in 1 layer " in text
    assert memory.MemoryReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    assert "stock autograd" not in memory.measure(_mlp(), torch.randn(4, 16)).to_markdown()


def test_stock_autograd_names_follow_the_prepared_model_in_measure_and_estimate() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), _Gate(), nn.ReLU(), nn.Linear(32, 10))
    prepared = ondevice.prepare(net, "full")
    measured = memory.measure(prepared, torch.randn(4, 16))
    assert measured.stock_modules == {"model.1": 4 * 32 * 4}  # fc's output, kept by the stock multiply
    assert set(measured.stock_modules) <= set(measured.modules)
    estimated = memory.estimate(prepared, input_shape=(16,), batch_size=4)
    assert estimated.stock_modules == measured.stock_modules
    bare = memory.measure(prepared.model, torch.randn(4, 16))
    assert bare.stock_modules == {"1": 512}


def test_allocator_figures_are_absent_off_cuda_and_validated() -> None:
    report = memory.measure(_mlp(), torch.randn(4, 16))
    assert report.cuda_allocated_bytes is None and report.cuda_activation_bytes is None
    assert report.cuda_peak_bytes is None and report.cuda_reserved_bytes is None
    assert not report.on_cuda and "CUDA allocator" not in report.to_markdown()
    on_gpu = memory.MemoryReport(
        1, 2, 3, 3, 0, 0, cuda_allocated_bytes=4096, cuda_activation_bytes=1024, cuda_peak_bytes=8192,
        cuda_reserved_bytes=2 << 20,
    )  # fmt: skip
    assert on_gpu.on_cuda
    assert memory.MemoryReport.from_dict(json.loads(json.dumps(on_gpu.to_dict()))) == on_gpu
    assert "| CUDA allocator: peak of the step | 8192 |" in on_gpu.to_markdown()
    old = {k: v for k, v in report.to_dict().items() if not k.startswith("cuda_") and k != "stock_modules"}
    assert memory.MemoryReport.from_dict(old) == report  # reports written before these fields still load
    with pytest.raises(ConfigError, match="cuda_peak_bytes must be None or an int >= 0"):
        memory.MemoryReport(0, 0, 0, 0, 0, 0, cuda_peak_bytes=-1)
    with pytest.raises(ConfigError, match="stock_modules must map layer names to bytes >= 0"):
        memory.MemoryReport(0, 0, 0, 0, 0, 0, stock_modules={"a": -1})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_allocator_figures_on_cuda() -> None:
    model = _mlp().cuda()
    x = torch.randn(64, 16, device="cuda")
    memory.measure(model, x)  # warm-up: library workspaces
    report = memory.measure(model, x)
    assert report.on_cuda
    # The allocator sees what the forward allocates; the input it keeps was allocated before.
    grown = report.cuda_activation_bytes
    assert grown is not None and grown >= report.activation_bytes - x.numel() * x.element_size()
    assert report.cuda_peak_bytes is not None and report.cuda_allocated_bytes is not None
    assert report.cuda_peak_bytes >= report.cuda_allocated_bytes + report.cuda_activation_bytes
    assert report.cuda_reserved_bytes is not None and report.cuda_reserved_bytes >= report.cuda_peak_bytes


class _Transient(nn.Module):
    """A layer whose forward makes (and drops) a 48 MiB temporary: the process's RSS must see it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        scratch = torch.ones(12 << 20)  # 48 MiB of touched pages
        return self.linear(x) + scratch[0]


def test_measure_reports_the_process_rss_of_the_step() -> None:
    report = memory.measure(_Transient(), torch.randn(4, 8))
    assert report.rss_before_bytes is not None and report.rss_peak_bytes is not None
    assert report.rss_peak_bytes >= report.rss_before_bytes
    added = report.rss_added_bytes
    assert added is not None and added >= 40 << 20  # the kernel's peak mark saw the temporary
    assert report.peak_bytes >= 48 << 20  # and so did the tensor tracker
    assert "process peak RSS during the step" in report.to_markdown()
    assert memory.MemoryReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_estimates_carry_no_rss() -> None:
    report = memory.estimate(_mlp(), (4, 16))
    assert report.rss_peak_bytes is None and report.rss_added_bytes is None
    with pytest.raises(ConfigError, match="rss_peak_bytes"):
        memory.MemoryReport(**{**report.to_dict(), "rss_peak_bytes": -1})
