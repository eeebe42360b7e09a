"""The per-layer cost table of :func:`memory.plan`: bytes of a sparse scheme by arithmetic, not a step.

One fake-tensor step of the all-biases scheme gives what each bias depth keeps; one fake forward gives
each layer's input size; two fake optimizer steps give the optimizer's state per trainable byte and per
tensor. ``tests/test_plan.py`` checks the table against :func:`memory.estimate` on random sparse schemes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from memory.budget import Budget
from memory.contribution import LayerInfo
from memory.estimate import OptimizerSpec, estimate, fake_copy, make_optimizer
from memory.measure import LossFn, distinct_storage_bytes
from ondevice import prepare
from ondevice.ops.registry import CompressMode
from ondevice.schemes import Sparse
from ondevice.schemes._tree import compute_layers, layer_bias


@dataclass(frozen=True)
class _Sparse:
    bias_k: int
    weights: tuple[tuple[int, float], ...]  # sorted (layer index, ratio)


class _CostTable:
    """Bytes of a sparse scheme from per-layer figures (see the module docstring, step 2)."""

    def __init__(
        self,
        model: nn.Module,
        head: str | None,
        shape: tuple[int, ...],
        budget: Budget,
        *,
        optimizer: OptimizerSpec | None,
        loss_fn: LossFn | None,
        compress: CompressMode | None = None,
    ) -> None:
        self.budget = budget
        pairs = compute_layers(model, head)
        self.layers = _layer_infos(pairs)
        n = len(self.layers)
        self.in_bytes = _input_bytes(model, [name for name, _ in pairs], shape)
        self.bias_bytes = []
        for name, _ in pairs:
            bias = layer_bias(model, name)
            self.bias_bytes.append(0 if bias is None else bias.numel() * bias.element_size())
        weights = [cast(Tensor, m.weight) for _, m in pairs]  # Conv/Linear leaves
        self.weight_numel = [w.numel() for w in weights]
        self.elem = [w.element_size() for w in weights]
        head_module = model.get_submodule(head) if head else None
        self.head_param_bytes = (
            distinct_storage_bytes(head_module.parameters()) if head_module is not None else 0
        )
        self.head_tensors = len(list(head_module.parameters())) if head_module is not None else 0
        all_bias = prepare(model, Sparse(bias_last_k=n, weight_layers=()), head=head, compress=compress)
        report = estimate(all_bias.model, shape, optimizer=optimizer, loss_fn=loss_fn, copy_model=False)
        order = list(report.modules)
        positions = {name: order.index(name) for name, _ in pairs if name in order}
        values = list(report.modules.values())
        self.chain = [sum(values[positions.get(name, 0) + 1 :]) for name, _ in pairs]
        self.head_only = report.modules.get(head or "", 0)
        self.opt_a, self.opt_b = _optimizer_state_model(optimizer)
        self.total_param_numel = sum(p.numel() for p in model.parameters())
        self.frozen_bits = budget.frozen_param_bits

    def channels(self, index: int, ratio: float) -> int:
        c = self.layers[index].in_channels
        return c if ratio >= 1.0 else max(1, -(-int(ratio * c * 1_000_000) // 1_000_000))

    def needed(self, cand: _Sparse) -> int:
        n = len(self.layers)
        starts = [i for i, _ in cand.weights]
        if cand.bias_k > 0:
            starts.append(n - cand.bias_k)
        activation = self.chain[min(starts)] if starts else self.head_only
        trainable = self.head_param_bytes
        tensors = self.head_tensors
        full_numel = 0
        for i in range(n - cand.bias_k, n):
            trainable += self.bias_bytes[i]
            tensors += self.bias_bytes[i] > 0
            full_numel += self.bias_bytes[i] // 4
        for i, ratio in cand.weights:
            c = self.channels(i, ratio)
            activation += self.in_bytes[i] * c // self.layers[i].in_channels
            trainable += self.weight_numel[i] * c // self.layers[i].in_channels * self.elem[i]
            tensors += 1
            if ratio >= 1.0:
                full_numel += self.weight_numel[i]
        needed = activation + 2 * trainable + int(self.opt_a * trainable) + self.opt_b * tensors
        if self.budget.count_frozen_params:
            frozen_numel = self.total_param_numel - full_numel - self.head_param_bytes // 4
            needed += frozen_numel * self.frozen_bits // 8
        return needed


def _layer_infos(pairs: Sequence[tuple[str, nn.Module]]) -> list[LayerInfo]:
    infos = []
    for i, (name, module) in enumerate(pairs):
        groups = int(getattr(module, "groups", 1))
        kernel = getattr(module, "kernel_size", (1,))
        kernel_numel = 1
        for k in kernel:
            kernel_numel *= int(k)
        in_channels = int(getattr(module, "in_channels", getattr(module, "in_features", 1)))
        nxt = pairs[i + 1][1] if i + 1 < len(pairs) else None
        first_pointwise = (
            kernel_numel == 1 and groups == 1 and nxt is not None and int(getattr(nxt, "groups", 1)) > 1
        )
        infos.append(LayerInfo(name, i, in_channels, groups, kernel_numel, first_pointwise))
    return infos


def _input_bytes(model: nn.Module, names: Sequence[str], shape: tuple[int, ...]) -> list[int]:
    """Bytes of each named layer's input, from one forward pass on fake tensors (no compute)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    work = fake_copy(model, mode)
    sizes: dict[str, int] = {}
    handles = []
    for name in names:

        def hook(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x = args[0]
            sizes.setdefault(name, x.numel() * x.element_size() if isinstance(x, Tensor) else 0)

        handles.append(work.get_submodule(name).register_forward_pre_hook(hook))
    dtype = next((p.dtype for p in work.parameters() if p.is_floating_point()), torch.float32)
    try:
        with mode, torch.no_grad():
            work.eval()(torch.empty(shape, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
    return [sizes.get(name, 0) for name in names]


def _optimizer_state_model(optimizer: OptimizerSpec | None) -> tuple[float, int]:
    """``(a, b)`` with optimizer state = ``a * trainable bytes + b * tensors``, from two fake steps."""
    mode = FakeTensorMode()
    figures = []
    with mode:
        for sizes in ((256,), (256, 768)):
            params = [nn.Parameter(torch.empty(s)) for s in sizes]
            for p in params:
                p.grad = torch.empty_like(p)
            opt = make_optimizer(optimizer, params)
            opt.step()
            state = [t for s in opt.state.values() for t in s.values() if isinstance(t, Tensor)]
            figures.append(distinct_storage_bytes(state))
    # one tensor of 1024 bytes: s0 = 1024 a + b; two of 1024 + 3072 bytes: s1 = 4096 a + 2 b
    a = (figures[1] - 2 * figures[0]) / 2048
    b = figures[0] - 1024 * a
    return float(a), round(b)
