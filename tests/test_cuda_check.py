"""bench/cuda_check.py on the CPU: it runs, its JSON holds every row, parity passes, refusals are rows."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "cuda_check.py"
OPS = ("relu", "seq conv-bn-relu6 (fused)", "layernorm")


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_cuda_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.integration
def test_cpu_run_reports_parity_bytes_and_refusals(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--models", "transformers/vit,timm/resnet18",
         "--schemes", "bias,lora", "--batch", "2", "--steps", "1", "--ops", ",".join(OPS),
         "--json", str(out), "--markdown"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"]["device"] == "cpu" and result["config"]["tolerance"] == 1e-5
    assert {(r["op"], r["mask"], r["layout"]) for r in result["ops"]} == {
        (op, mask, layout) for op in OPS for mask in ("bit", "byte")
        for layout in ("contiguous", "channels_last", "odd size")
    }  # fmt: skip
    assert all(r["converted"] and r["ok"] for r in result["ops"]), [r for r in result["ops"] if not r["ok"]]

    rows = {(r["model"], r["scheme"]): r for r in result["cases"]}
    assert set(rows) == {(m, s) for m in ("transformers/vit", "timm/resnet18") for s in ("bias", "lora")}
    # A convolutional network has no Linear layer for LoRA besides its head: prepare refuses, the run goes on.
    refused = rows[("timm/resnet18", "lora")]
    assert refused["status"] == "refused" and not refused["accepted"]
    assert refused["error"].startswith("prepare: ConfigError:") and "LoRA" in refused["error"]
    for row in rows.values():
        if not row["accepted"]:
            continue
        where = f"{row['model']} / {row['scheme']}"
        assert row["status"] == "pass", (where, row.get("error"), row.get("worst"))
        assert 0.0 <= row["max_rel"] <= 1e-5, where
        stock, ours = row["memory"]["stock"], row["memory"]["ondevice"]
        assert stock["activation_bytes"] == stock["tracker_activation_bytes"]  # CPU: the trackers' figures
        assert row["activation_ratio"] == pytest.approx(stock["activation_bytes"] / ours["activation_bytes"])
        assert row["peak_ratio"] == pytest.approx(stock["peak_bytes"] / ours["peak_bytes"])
        assert ours["activation_bytes"] <= stock["activation_bytes"], where
        assert ours["report"]["cuda_peak_bytes"] is None
        assert set(row["step_ms"]) == {"stock", "ondevice"} and row["time_ratio"] > 0
    assert rows[("timm/resnet18", "bias")]["accepted"]
    summary = result["summary"]
    assert summary["refused"] >= 1 and summary["model_cases"] == 4
    assert done.returncode == (0 if summary["ok"] else 1)
    assert "| timm/resnet18 | lora | refused |" in done.stdout
    assert "| timm/resnet18 | bias | pass |" in done.stdout


def test_cuda_device_without_cuda_says_to_use_cpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "timm/resnet18"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2
    assert "CUDA is not available" in done.stderr and "--device cpu" in done.stderr


def test_relative_error_ignores_float_noise_but_not_real_differences() -> None:
    check = _script()
    stock = {"w": torch.tensor([1.0, -2.0]), "noise": torch.tensor([1e-10, -1e-10]), "none": None}
    same = {"w": torch.tensor([1.0, -2.0]), "noise": torch.tensor([-3e-10, 2e-10]), "none": None}
    assert check.relative_errors(stock, same)[0] <= 1e-5  # noise far below the largest gradient
    assert check.relative_errors(stock, same, floor=0.0)[0] == pytest.approx(4.0)  # 4e-10 / 1e-10
    off = dict(same, w=torch.tensor([1.0, -2.001]))
    error, where = check.relative_errors(stock, off)
    assert where == "w" and error == pytest.approx(0.0005, rel=1e-3)
    assert math.isinf(check.relative_errors(stock, dict(same, none=torch.zeros(1)))[0])
    assert math.isinf(check.relative_errors(stock, dict(same, w=torch.tensor([1.0, math.nan])))[0])
    assert math.isinf(check.relative_errors(stock, {"w": stock["w"]})[0])
