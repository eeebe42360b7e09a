"""A plan said to fit a process budget runs within it: peak RSS of the planned step, in a fresh subprocess.

``memory.plan`` under ``Budget.for_process`` budgets what the eager training step adds to its process's
resident memory above ``import torch, ondevice, memory``. Here each plan's scheme trains for a few steps in
a fresh interpreter under the SDK's process policy (``memory.process.lean_process``, a trim after each
step, momentum SGD written as in-place tensor ops, which does not import ``torch._dynamo`` as
``torch.optim`` does), and the kernel's peak RSS above the import must stay within the budget and within
the plan's own figure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import memory
from memory import Budget
from memory.process import current_rss_bytes, lean_process, peak_rss_bytes, reset_peak_rss, rss_parts, trim
from ondevice.models import create_model

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
MODEL = {"width_mult": 0.35, "resolution": 96, "num_classes": 10}
BATCH = 8

_CHILD = """
import json, sys
import torch, ondevice, memory
from memory import process
import_bytes = process.current_rss_bytes()
process.reset_peak_rss()
process.lean_process(threads=1)
from torch.nn import functional as F
from ondevice.models import create_model
spec = json.loads(sys.argv[1])
torch.manual_seed(0)
net = create_model("mobilenetv2", **spec["model"])
model = ondevice.prepare(net, spec["scheme"])  # a PreparedModel: its train() keeps frozen norms in eval
model.train()
x = torch.randn(spec["batch"], 3, spec["model"]["resolution"], spec["model"]["resolution"])
y = torch.randint(0, 10, (spec["batch"],))
params = [p for p in model.parameters() if p.requires_grad]
momentum = [None] * len(params)
for _ in range(spec["steps"]):
    for p in params:
        p.grad = None
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for i, p in enumerate(params):
            if momentum[i] is None:
                momentum[i] = p.grad.clone()
            else:
                momentum[i].mul_(0.9).add_(p.grad)
            p.add_(momentum[i], alpha=-1e-3)
    process.trim()
print(json.dumps({"added_bytes": process.peak_rss_bytes() - import_bytes, "parts": process.rss_parts()}))
"""


def _peak_added_in_subprocess(scheme: dict[str, object], *, steps: int = 3) -> tuple[int, dict[str, int]]:
    spec = {"model": MODEL, "scheme": scheme, "batch": BATCH, "steps": steps}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return int(figures["added_bytes"]), {k: int(v) for k, v in figures["parts"].items()}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("budget_mib", [78, 88, 116])
def test_a_plan_that_fits_a_process_budget_runs_within_it(budget_mib: int) -> None:
    budget = Budget.for_process(f"{budget_mib}MiB")
    net = create_model("mobilenetv2", **MODEL)
    chosen = memory.plan(net, budget, batch_size=BATCH)
    assert chosen.needed_bytes <= budget.total_bytes
    assert chosen.to_dict()["requirement"]["counts_process"] is True
    assert "peak RSS" in chosen.to_markdown()
    added, parts = _peak_added_in_subprocess(chosen.scheme.to_dict())
    after = ", ".join(f"{k} {v / MiB:.1f}" for k, v in parts.items())
    where = f"{chosen.scheme.name} under {budget_mib} MiB: measured {added / MiB:.1f} MiB"
    where += f" (RSS after: {after} MiB)"
    assert added <= chosen.needed_bytes, f"{where}, planned {chosen.needed_bytes / MiB:.1f} MiB"
    assert added <= budget.total_bytes, where


def test_process_budget_terms_add_up_and_exceed_the_tensor_terms() -> None:
    import ondevice

    report = memory.estimate(ondevice.prepare(create_model("mobilenetv2", **MODEL), "bias"), batch_size=BATCH)
    tensors = Budget(10**9, count_frozen_params=True)
    process = Budget.for_process("1GiB")
    terms = memory.report.needed_terms(report, process)
    assert sum(terms.values()) == memory.budget_bytes_needed(report, process)
    assert memory.budget_bytes_needed(report, process) > memory.budget_bytes_needed(report, tensors)
    assert memory.budget_bytes_needed(report, process) >= process.process_overhead_bytes + report.peak_bytes
    assert "resident memory the eager training step adds" in memory.report.explain_needed(report, process)


def test_process_helpers_read_and_reset_the_peak() -> None:
    settings = lean_process(mmap_threshold_bytes=None, mkldnn=True)
    assert settings.mkldnn_enabled and settings.mmap_threshold_bytes is None
    assert current_rss_bytes() > 0 and peak_rss_bytes() >= current_rss_bytes() // 2
    if reset_peak_rss():
        before = peak_rss_bytes()
        scratch = bytearray(64 * MiB)
        scratch[::4096] = b"x" * len(scratch[::4096])
        assert peak_rss_bytes() - before >= 48 * MiB
        del scratch
    trim()
    if sys.platform.startswith("linux"):
        assert {"anon", "file"} <= set(rss_parts())
