"""The lean optimizers are torch's SGD and Adam, bit for bit on CPU, without importing torch._dynamo."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch

from ondevice.optim import LeanAdam, LeanSGD, OptimizerConfig, build_optimizer

CASES: list[tuple[type[torch.optim.Optimizer], type[torch.optim.Optimizer], dict[str, Any]]] = [
    (LeanSGD, torch.optim.SGD, {"lr": 0.1}),
    (LeanSGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    (LeanSGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    (LeanSGD, torch.optim.SGD, {"lr": 0.05, "weight_decay": 0.01}),
    (LeanAdam, torch.optim.Adam, {"lr": 1e-3}),
    (LeanAdam, torch.optim.Adam, {"lr": 3e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 1e-2}),
]


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((7, 5), (5,), (3, 2, 2))]


@pytest.mark.parametrize(("lean", "stock", "kwargs"), CASES)
def test_lean_steps_equal_torch_bit_for_bit(lean: type, stock: type, kwargs: dict[str, Any]) -> None:
    mine, theirs = _params(0), _params(0)
    opt_mine, opt_theirs = lean(mine, **kwargs), stock(theirs, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=gen) for p in mine]
        for params in (mine, theirs):
            for p, g in zip(params, grads, strict=True):
                p.grad = None if step == 2 and p.dim() == 1 else g.clone()  # a parameter without a gradient
        opt_mine.step()
        opt_theirs.step()
        opt_mine.zero_grad(set_to_none=True)
        opt_theirs.zero_grad(set_to_none=True)
        for a, b in zip(mine, theirs, strict=True):
            assert torch.equal(a, b), f"step {step}"
            assert a.grad is None and b.grad is None
    for a, b in zip(mine, theirs, strict=True):  # the same state, slot for slot (checkpoints carry it)
        assert opt_mine.state[a].keys() == opt_theirs.state[b].keys()
        for slot, value in opt_theirs.state[b].items():
            mine_slot = opt_mine.state[a][slot]
            assert torch.equal(mine_slot, value) and mine_slot.dtype == value.dtype


def test_build_optimizer_is_lean_on_cpu_and_schedulers_accept_it() -> None:
    params = _params(0)
    sgd = build_optimizer(OptimizerConfig(kind="sgd", lr=0.1, momentum=0.9), params)
    adam = build_optimizer(OptimizerConfig(kind="adam", lr=1e-3), params)
    assert isinstance(sgd, LeanSGD) and isinstance(adam, LeanAdam)
    schedule = torch.optim.lr_scheduler.StepLR(sgd, step_size=1, gamma=0.5)
    for p in params:
        p.grad = torch.ones_like(p)
    sgd.step()
    schedule.step()
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="more than one parameter group"):
        LeanSGD([params[0], params[0]], lr=0.1)


def test_training_with_the_sdk_optimizer_never_imports_dynamo() -> None:
    """A prepared model trained by the Trainer, in a fresh process: torch._dynamo stays unimported."""
    code = (
        "import sys, torch, ondevice\n"
        "from ondevice.models import create_model\n"
        "torch.manual_seed(0)\n"
        "net = create_model('cnn', num_classes=3)\n"
        "for optimizer in ('sgd', 'adam'):\n"
        "    trainer = ondevice.Trainer(ondevice.prepare(net, 'bias'), optimizer=optimizer, momentum=None)\n"
        "    for _ in range(3):\n"
        "        trainer.step(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]))\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:500]
