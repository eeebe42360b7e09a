"""The whole CUDA check in one run: every memory-saving op, then every model x scheme, against stock PyTorch.

Two sections, both compared with stock PyTorch on the same device in the same run:

* **ops**: small modules around each memory-saving op (convolutions, linear layers, norms, activations,
  pooling, dropout, the fused conv-BatchNorm-ReLU and the in-place activations of ``nn.Sequential``),
  with 1-bit and byte masks, on contiguous, channels-last (or strided) and odd-sized input. Each case
  compares the output, the input's gradient and every trainable gradient of ``ops.convert(module)`` with
  the stock module's.
* **models**: every model of ``bench/library_models.py`` (transformers, timm, torchvision, built from small
  configs) and the zoo's MobileNetV2, under the schemes bias, last_layer, sparse, full and lite_residual
  (CNNs) or lora (transformers). Stock is ``prepare(..., memory_saving=False)``, prepared from the same
  weights under the same seed. Per case: whether prepare accepts it (or its error), gradient parity
  (largest relative error over the trainable gradients and the logits, one step on one batch), the
  activation bytes the forward holds and the step's peak (the CUDA caching allocator's figures from
  ``memory.measure`` on CUDA, its tensor trackers' on CPU; each model alone on the device), and the step
  time (forward, cross-entropy, backward, SGD step; median of ``--steps`` warm steps, stock and ondevice
  interleaved, the device synchronised around every step).

Parity passes at a relative error of 1e-5 (TF32 off for matmul and cuDNN). Relative to what: each
tensor's error is divided by the larger of its own largest stock value and 1e-4 times the largest stock
value of the model, so a gradient that is only float noise (e.g. a bias in front of a train-mode
BatchNorm, which should be zero) cannot fail the check on its own; the JSON also has the error without
that floor (``max_rel_unfloored``). Dropout and stochastic depth are put in eval mode (stock's
CUDA dropout draws its noise differently); everything else trains as prepared.

Exit status 1 if any op case or any accepted model case fails parity or crashes, 0 otherwise; a model
that prepare refuses (an ``OnDeviceError``) is reported, not failed.

    python3 bench/cuda_check.py                                  # the whole check on cuda:0
    python3 bench/cuda_check.py --json cuda.json --markdown      # the README's table and the JSON
    python3 bench/cuda_check.py --device cpu --models resnet --schemes bias,sparse --steps 3
    python3 bench/cuda_check.py --models timm,ondevice/mobilenetv2 --ops none

``--models`` takes model names (``timm/resnet18``), families (``resnet``), libraries (``timm``) or kinds
(``cnn``); ``--schemes`` replaces each model's default schemes (a scheme that does not fit a model is then
reported as refused). Runs with only the repository on ``PYTHONPATH``; needs torch, and transformers, timm
and torchvision for their models (a missing library marks its models unavailable).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

if __package__ in (None, ""):  # run as a script: the repository root on the path, as for bench/memory.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.library_models import LIBRARY_MODELS, LibraryModel, logits_of
from memory import measure
from memory.budget import format_bytes
from ondevice import prepare
from ondevice.errors import OnDeviceError
from ondevice.ops import MemorySavingModule, convert, supported_types

TOLERANCE = 1e-5
NOISE_FLOOR = 1e-4
CNN_SCHEMES = ("bias", "last_layer", "sparse", "full", "lite_residual")
TRANSFORMER_SCHEMES = ("bias", "last_layer", "sparse", "full", "lora")
LAYOUTS = ("contiguous", "channels_last", "odd size")


def _zoo_mobilenetv2() -> nn.Module:
    from ondevice.models import create_model

    return create_model("mobilenetv2", width_mult=1.0, resolution=128, num_classes=10)


ZOO_MODELS = {
    "ondevice/mobilenetv2": LibraryModel(
        "ondevice/mobilenetv2", "ondevice", "cnn", "mobilenetv2", _zoo_mobilenetv2, resolution=128
    ),
}
ALL_MODELS: dict[str, LibraryModel] = {**LIBRARY_MODELS, **ZOO_MODELS}


# -- comparing with stock -------------------------------------------------------------------------------
def relative_errors(stock: dict[str, Tensor | None], ours: dict[str, Tensor | None], *,
                    floor: float = NOISE_FLOOR) -> tuple[float, str]:  # fmt: skip
    """The largest relative error of ``ours`` against ``stock`` (see the module docstring) and where.

    A tensor missing on one side, a shape mismatch or a non-finite value counts as infinitely wrong.
    """
    if set(stock) != set(ours):
        return math.inf, f"names differ: {sorted(set(stock) ^ set(ours))[:3]}"
    scale = max((float(t.detach().abs().max()) for t in stock.values() if t is not None and t.numel()),
                default=0.0)  # fmt: skip
    worst, where = 0.0, ""
    for name, a in stock.items():
        b = ours[name]
        if a is None and b is None:
            continue
        if a is None or b is None or a.shape != b.shape:
            return math.inf, name
        a64, b64 = a.detach().double(), b.detach().to(a.device).double()
        if not (bool(torch.isfinite(a64).all()) and bool(torch.isfinite(b64).all())):
            return math.inf, name
        if a64.numel() == 0:
            continue
        denominator = max(float(a64.abs().max()), floor * scale, 1e-30)
        error = float((a64 - b64).abs().max()) / denominator
        if error > worst:
            worst, where = error, name
    return worst, where


def _cell(error: float | None) -> str:
    if error is None:
        return ""
    return "ok" if error <= TOLERANCE else ("inf" if math.isinf(error) else f"{error:.1e}")


def _short(error: BaseException) -> str:
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:240]}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- ops ------------------------------------------------------------------------------------------------
class Shift(nn.Module):
    """A trainable per-channel shift (channels at dim 1 of images, last dim of token sequences).

    Put around each op under test, so a trainable parameter sits on both sides and the op's input
    gradient is checked through the parameter in front of it. It has no op and runs stock.
    """

    def __init__(self, channels: int, *, tokens: bool = False) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.linspace(-0.2, 0.3, channels))
        self.tokens = tokens

    def forward(self, x: Tensor) -> Tensor:
        shape = [1] * x.dim()
        shape[-1 if self.tokens else 1] = -1
        return x + self.bias.view(shape)


@dataclass(frozen=True)
class OpCase:
    """A module around one op: ``body`` maps ``channels`` to ``out_channels``; ``tokens``: (N, L, C) input."""

    name: str
    body: Callable[[], nn.Module]
    channels: int = 6
    out_channels: int = 6
    tokens: bool = False
    train_mode: bool = False
    weights_train: bool = False

    def build(self) -> nn.Module:
        torch.manual_seed(1)
        body = self.body()
        for module in body.modules():  # non-trivial running statistics for eval-mode norms
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                with torch.no_grad():
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
        model = nn.Sequential(Shift(self.channels, tokens=self.tokens), body,
                              Shift(self.out_channels, tokens=self.tokens))  # fmt: skip
        for name, p in model.named_parameters():
            p.requires_grad_(self.weights_train or name.startswith(("0.", "2.")) or name.endswith("bias"))
        return model.train(self.train_mode)

    def example(self, layout: str, device: torch.device) -> Tensor:
        generator = torch.Generator().manual_seed(2)
        odd = layout == "odd size"
        if self.tokens:
            x = torch.randn(5 if odd else 4, 3, self.channels, generator=generator).to(device)
            return x.transpose(0, 1) if layout == "channels_last" else x.transpose(0, 1).contiguous()
        shape = (3, self.channels, 7, 9) if odd else (2, self.channels, 8, 8)
        x = torch.randn(shape, generator=generator).to(device)
        return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _seq(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


def _conv_bn(act: type[nn.Module] | None, **conv: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        layers: list[nn.Module] = [nn.Conv2d(6, 6, 3, padding=1, bias=False, **conv), nn.BatchNorm2d(6)]
        return _seq(*layers, *([act()] if act is not None else []))

    return build


OP_CASES: tuple[OpCase, ...] = (
    OpCase("conv3x3", lambda: nn.Conv2d(6, 8, 3, padding=1), out_channels=8),
    OpCase("conv3x3, weight trains", lambda: nn.Conv2d(6, 8, 3, padding=1), out_channels=8,
           weights_train=True),
    OpCase("conv padding same, even kernel", lambda: nn.Conv2d(6, 6, 4, padding="same")),
    OpCase("depthwise conv", lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6)),
    OpCase("grouped conv1x1", lambda: nn.Conv2d(6, 6, 1, groups=2)),
    OpCase("linear", lambda: nn.Linear(6, 10), out_channels=10, tokens=True),
    OpCase("linear, weight trains", lambda: nn.Linear(6, 10), out_channels=10, tokens=True,
           weights_train=True),
    OpCase("batchnorm eval", lambda: nn.BatchNorm2d(6)),
    OpCase("batchnorm eval, scale trains", lambda: nn.BatchNorm2d(6), weights_train=True),
    OpCase("batchnorm train", lambda: nn.BatchNorm2d(6), train_mode=True, weights_train=True),
    OpCase("groupnorm", lambda: nn.GroupNorm(2, 6)),
    OpCase("layernorm", lambda: nn.LayerNorm(6), tokens=True),
    OpCase("layernorm, weight trains", lambda: nn.LayerNorm(6), tokens=True, weights_train=True),
    OpCase("relu", nn.ReLU),
    OpCase("relu inplace", lambda: nn.ReLU(inplace=True)),
    OpCase("relu6", nn.ReLU6),
    OpCase("leakyrelu", lambda: nn.LeakyReLU(0.1)),
    OpCase("silu", nn.SiLU),
    OpCase("gelu", nn.GELU, tokens=True),
    OpCase("gelu tanh", lambda: nn.GELU(approximate="tanh"), tokens=True),
    OpCase("hardswish", nn.Hardswish),
    OpCase("sigmoid", nn.Sigmoid),
    OpCase("tanh", nn.Tanh),
    OpCase("maxpool", lambda: nn.MaxPool2d(3, 2, 1)),
    OpCase("avgpool", lambda: nn.AvgPool2d(2)),
    OpCase("adaptive avgpool", lambda: nn.AdaptiveAvgPool2d(1)),
    OpCase("dropout p=0 (train)", lambda: nn.Dropout(0.0), train_mode=True),
    OpCase("seq conv-bn-relu (fused)", _conv_bn(nn.ReLU)),
    OpCase("seq conv-bn-relu6 (fused)", _conv_bn(nn.ReLU6)),
    OpCase("seq conv-bn (fused)", _conv_bn(None)),
    OpCase("seq dwconv-bn-relu6 (fused)", _conv_bn(nn.ReLU6, groups=6)),
    OpCase("seq conv-bn-relu6, conv trains", _conv_bn(nn.ReLU6), weights_train=True),
    OpCase("seq conv-relu (in place)", lambda: _seq(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())),
    OpCase("seq bn-relu6 (in place)", lambda: _seq(nn.BatchNorm2d(6), nn.ReLU6())),
    OpCase("seq linear-relu (in place)", lambda: _seq(nn.Linear(6, 6), nn.ReLU()), tokens=True),
    OpCase("seq linear-leakyrelu (in place)", lambda: _seq(nn.Linear(6, 6), nn.LeakyReLU(0.2)), tokens=True),
)


def _op_step(model: nn.Module, x0: Tensor) -> dict[str, Tensor | None]:
    """Output, input gradient and trainable gradients of one forward/backward of ``model``."""
    x = x0.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    out = model(x)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
    out.backward(g_out)
    tensors: dict[str, Tensor | None] = {"output": out.detach(), "input.grad": x.grad}
    tensors.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return tensors


def run_op_cases(cases: Iterable[OpCase], device: torch.device) -> list[dict[str, Any]]:
    """Every op case x mask x layout on ``device``, compared with the stock module."""
    rows = []
    for case in cases:
        for mask in ("bit", "byte"):
            for layout in LAYOUTS:
                row: dict[str, Any] = {"op": case.name, "mask": mask, "layout": layout, "max_rel": None,
                                       "converted": None, "error": None}  # fmt: skip
                try:
                    stock = case.build().to(device)
                    ours = convert(copy.deepcopy(stock), mask=mask)
                    row["converted"] = any(isinstance(m, MemorySavingModule) for m in ours.modules())
                    x = case.example(layout, device)
                    row["max_rel"], row["worst"] = relative_errors(_op_step(stock, x), _op_step(ours, x))
                except Exception as error:
                    row["error"] = _short(error)
                error = row["max_rel"]
                row["ok"] = row["error"] is None and error is not None and error <= TOLERANCE
                rows.append(row)
    return rows


# -- models ---------------------------------------------------------------------------------------------
def select_models(spec: str | None) -> list[LibraryModel]:
    """Models named by ``spec``: comma-separated names, families, libraries or kinds (all if None)."""
    if not spec:
        return list(ALL_MODELS.values())
    chosen: dict[str, LibraryModel] = {}
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        found = [m for m in ALL_MODELS.values() if token in (m.name, m.family, m.library, m.kind)]
        if not found:
            families = sorted({m.family for m in ALL_MODELS.values()})
            raise SystemExit(f"--models: {token!r} names no model; choose names {sorted(ALL_MODELS)}, "
                             f"families {families}, libraries or kinds (cnn, vision-transformer, "
                             f"text-transformer)")  # fmt: skip
        chosen.update((m.name, m) for m in found)
    return [m for m in ALL_MODELS.values() if m.name in chosen]


def _quiet_dropout(model: nn.Module) -> nn.Module:
    """Dropout and stochastic depth in eval mode (the rest keeps its mode)."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) or type(module).__name__ in (
            "DropPath", "StochasticDepth",
        ):  # fmt: skip
            module.eval()
    return model


def _loss(output: Any, target: Tensor) -> Tensor:
    return F.cross_entropy(logits_of(output), target)


def _gradients(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor | None]:
    """Logits and trainable gradients of one step, copied to the CPU."""
    model.zero_grad(set_to_none=True)
    logits = logits_of(model(x))
    F.cross_entropy(logits, y).backward()
    found: dict[str, Tensor | None] = {"logits": logits.detach().cpu()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            found[name] = None if p.grad is None else p.grad.detach().cpu()
    model.zero_grad(set_to_none=True)
    return found


def _memory(report: Any, on_cuda: bool) -> dict[str, Any]:
    activation = report.cuda_activation_bytes if on_cuda else report.activation_bytes
    peak = report.cuda_peak_bytes if on_cuda else report.peak_bytes
    figures = {k: v for k, v in report.to_dict().items() if k != "modules"}  # the breakdown is long
    return {"activation_bytes": activation, "peak_bytes": peak,
            "tracker_activation_bytes": report.activation_bytes, "tracker_peak_bytes": report.peak_bytes,
            "stock_autograd_bytes": report.stock_bytes, "stock_autograd_layers": len(report.stock_modules),
            "report": figures}  # fmt: skip


def _step_fn(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _loss(model(x), y).backward()
        optimizer.step()

    return step


def time_steps(steps: dict[str, Callable[[], None]], *, reps: int, device: torch.device) -> dict[str, float]:
    """Median milliseconds per step of each, interleaved round by round, synchronised around each step."""
    for _ in range(2):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def run_model_case(entry: LibraryModel, base: nn.Module, scheme: str, *, device: torch.device, batch: int,
                   steps: int, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """One model under one scheme: accepted?, gradient parity, memory and step time vs stock."""
    row: dict[str, Any] = {"model": entry.name, "library": entry.library, "kind": entry.kind,
                           "scheme": scheme, "status": "error", "error": None, "accepted": False}  # fmt: skip
    prepared: dict[str, nn.Module] = {}
    phase, seconds, clock = "prepare", {}, time.perf_counter()
    row["seconds"] = seconds  # per phase, to see where a run's time goes

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 2)
        clock = now

    try:
        for variant, saving in (("stock", False), ("ondevice", True)):
            torch.manual_seed(seed)  # added branches (LoRA, lite residual) start alike
            prepared[variant] = prepare(base, scheme, memory_saving=saving)
        lap("prepare")
        phase, row["accepted"] = "step", True
        x = entry.example(batch, seed=seed, device=device)
        y = entry.targets(batch, seed=seed, device=device)
        grads, memory = {}, {}
        for variant, model in prepared.items():  # each alone on the device for its memory figures
            model.to(device).train()
            _quiet_dropout(model)
            grads[variant] = _gradients(model, x, y)  # also the warm-up step before measuring
            gc.collect()
            memory[variant] = _memory(measure(model, x, target=y, loss_fn=_loss), device.type == "cuda")
            model.to("cpu")
        row["max_rel"], row["worst"] = relative_errors(grads["stock"], grads["ondevice"])
        row["max_rel_unfloored"] = relative_errors(grads["stock"], grads["ondevice"], floor=0.0)[0]
        row["parity_ok"] = row["max_rel"] <= TOLERANCE
        row["memory"] = memory
        stock_act, ours_act = memory["stock"]["activation_bytes"], memory["ondevice"]["activation_bytes"]
        row["activation_ratio"] = _ratio(stock_act, ours_act)
        row["peak_ratio"] = _ratio(memory["stock"]["peak_bytes"], memory["ondevice"]["peak_bytes"])
        lap("parity and memory")
        phase = "timing"
        for model in prepared.values():
            model.to(device)
        timing = time_steps({v: _step_fn(m, x, y) for v, m in prepared.items()}, reps=steps, device=device)
        row["step_ms"] = timing
        row["time_ratio"] = _ratio(timing["ondevice"], timing["stock"])
        lap("timing")
        row["status"] = "pass" if row["parity_ok"] else "FAIL"
    except Exception as error:
        refused = phase == "prepare" and isinstance(error, OnDeviceError)
        row["status"] = "refused" if refused else "error"
        row["error"] = f"{phase}: {_short(error)}"
    finally:
        for model in prepared.values():
            model.to("cpu")
        del prepared
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def run_models(models: list[LibraryModel], schemes: tuple[str, ...] | None, *, device: torch.device,
               batch: int, steps: int, budget_s: float, started: float) -> list[dict[str, Any]]:  # fmt: skip
    """Every model x scheme; cases past the time budget are recorded as skipped."""
    rows = []
    for entry in models:
        own = schemes or (CNN_SCHEMES if entry.kind == "cnn" else TRANSFORMER_SCHEMES)
        base: nn.Module | None = None
        build_error: tuple[str, str] | None = None
        if time.perf_counter() - started < budget_s:
            try:
                base = entry.build(seed=0)
            except ImportError as error:
                build_error = ("unavailable", f"build: {_short(error)}")
            except Exception as error:
                build_error = ("error", f"build: {_short(error)}")
        for scheme in own:
            if time.perf_counter() - started >= budget_s:
                row = {"model": entry.name, "library": entry.library, "kind": entry.kind, "scheme": scheme,
                       "status": "skipped", "error": f"time budget of {budget_s:.0f} s spent"}  # fmt: skip
            elif base is None:
                status, message = build_error or ("error", "build failed")
                row = {"model": entry.name, "library": entry.library, "kind": entry.kind, "scheme": scheme,
                       "status": status, "error": message}  # fmt: skip
            else:
                row = run_model_case(entry, base, scheme, device=device, batch=batch, steps=steps)
            rows.append(row)
            note = f" ({row['error']})" if row.get("error") else ""
            print(f"[{time.perf_counter() - started:6.1f} s] {entry.name} {scheme}: {row['status']}{note}",
                  file=sys.stderr, flush=True)  # fmt: skip
    return rows


# -- tables ---------------------------------------------------------------------------------------------
def _bytes(n: int | None) -> str:
    return "" if n is None else format_bytes(n)


def _x(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def model_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "scheme", "status", "grad rel err", "act stock", "act ondevice", "x less act",
              "peak stock", "peak ondevice", "on stock autograd", "ms stock", "ms ondevice",
              "x time"]  # fmt: skip
    body = []
    for row in rows:
        if "memory" not in row:
            body.append([row["model"], row["scheme"], row["status"], (row.get("error") or "")[:90]]
                        + [""] * (len(header) - 4))  # fmt: skip
            continue
        stock, ours = row["memory"]["stock"], row["memory"]["ondevice"]
        timing = row.get("step_ms", {})
        body.append([
            row["model"], row["scheme"], row["status"], f"{row['max_rel']:.1e}",
            _bytes(stock["activation_bytes"]), _bytes(ours["activation_bytes"]),
            _x(row["activation_ratio"], 1),
            _bytes(stock["peak_bytes"]), _bytes(ours["peak_bytes"]), _bytes(ours["stock_autograd_bytes"]),
            _x(timing.get("stock"), 1), _x(timing.get("ondevice"), 1), _x(row.get("time_ratio")),
        ])  # fmt: skip
    return header, body


def grid_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Models x schemes: per cell the activation and peak saving (stock / ondevice), or what went wrong."""
    schemes: list[str] = []
    cells: dict[str, dict[str, str]] = {}
    for row in rows:
        scheme = "lite_residual / lora" if row["scheme"] in ("lite_residual", "lora") else row["scheme"]
        if scheme not in schemes:
            schemes.append(scheme)
        if row["status"] != "pass" or "memory" not in row:
            cell = row["status"].upper()
        else:
            stock, ours = row["memory"]["stock"], row["memory"]["ondevice"]
            peak = _ratio(stock["peak_bytes"], ours["peak_bytes"])
            cell = f"{_x(row['activation_ratio'], 1)}x / {_x(peak, 1)}x"
        cells.setdefault(row["model"], {})[scheme] = cell
    header = ["model", *schemes]
    return header, [[model, *(by.get(s, "") for s in schemes)] for model, by in cells.items()]


def op_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["op", "op swapped in", *(f"{mask} {layout}" for mask in ("bit", "byte") for layout in LAYOUTS)]
    by_op: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for row in rows:
        by_op.setdefault(row["op"], {})[(row["mask"], row["layout"])] = row
    body = []
    for op, cells in by_op.items():
        swapped = any(r.get("converted") for r in cells.values())
        body.append([op, "yes" if swapped else "no (stock)"] + [
            "ERROR" if (r := cells.get((m, lay))) and r["error"] else _cell(r["max_rel"] if r else None)
            for m in ("bit", "byte") for lay in LAYOUTS
        ])  # fmt: skip
    return header, body


def render(header: list[str], body: list[list[str]], *, markdown: bool) -> str:
    if markdown:
        escape = [[c.replace("|", "\\|") for c in row] for row in body]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in escape])
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*row) for row in body])  # fmt: skip


def summarise(ops: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    every: dict[str, bool] = {}
    for row in rows:
        every[row["model"]] = every.get(row["model"], True) and row["status"] == "pass"
    ratios = {s: [r["time_ratio"] for r in rows if r["scheme"] == s and r.get("time_ratio") is not None]
              for s in ("bias", "sparse")}  # fmt: skip
    failed_ops = [f"{r['op']} / {r['mask']} / {r['layout']}" for r in ops if not r["ok"]]
    failed_models = [
        f"{r['model']} / {r['scheme']}: {r['status']}" for r in rows if r["status"] in ("FAIL", "error")
    ]
    return {
        "op_cases": len(ops), "op_cases_passing": len(ops) - len(failed_ops), "failed_ops": failed_ops,
        "model_cases": len(rows), "accepted": sum(bool(r.get("accepted")) for r in rows),
        "passing": sum(r["status"] == "pass" for r in rows), "failed_models": failed_models,
        "refused": sum(r["status"] == "refused" for r in rows),
        "skipped": sum(r["status"] in ("skipped", "unavailable") for r in rows),
        "models_passing_every_scheme": sorted(m for m, ok in every.items() if ok),
        "worst_time_ratio": {s: max(v) if v else None for s, v in ratios.items()},
        "ok": not failed_ops and not failed_models,
    }  # fmt: skip


def _environment(device: torch.device) -> dict[str, Any]:
    found: dict[str, Any] = {"torch": torch.__version__, "device": str(device),
                             "cuda": torch.version.cuda, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                             "tf32_cudnn": torch.backends.cudnn.allow_tf32}  # fmt: skip
    if device.type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(device)
    for library in ("torchvision", "timm", "transformers"):
        module = sys.modules.get(library)
        found[library] = getattr(module, "__version__", None) if module else None
    return found


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--models", default=None, help="comma-separated names, families, libraries or kinds")
    parser.add_argument("--schemes", default=None, help="comma-separated; replaces each model's defaults")
    parser.add_argument("--ops", default="all", help="'all', 'none' or comma-separated op case names")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="stop starting model cases after this many seconds (the rest: skipped)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every figure as JSON to PATH")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables (for the README)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}, "
                     f"CUDA build {torch.version.cuda}); run on a GPU machine or check the CPU path with "
                     f"--device cpu")  # fmt: skip
    if args.batch < 1 or args.steps < 1:
        parser.error("--batch and --steps must be >= 1")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    warnings.filterwarnings("ignore", message="Using padding='same' with even kernel")  # the op case's point
    started = time.perf_counter()
    models = select_models(args.models)
    schemes = tuple(s.strip() for s in args.schemes.split(",") if s.strip()) if args.schemes else None
    if args.ops == "none":
        cases: list[OpCase] = []
    elif args.ops == "all":
        cases = list(OP_CASES)
    else:
        wanted = {s.strip() for s in args.ops.split(",")}
        cases = [c for c in OP_CASES if c.name in wanted]
        if len(cases) != len(wanted):
            parser.error(f"--ops: unknown {sorted(wanted - {c.name for c in cases})}; "
                         f"choose from {[c.name for c in OP_CASES]}")  # fmt: skip
    ops = run_op_cases(cases, device)
    print(f"[{time.perf_counter() - started:6.1f} s] {len(ops)} op cases done", file=sys.stderr, flush=True)
    rows = run_models(models, schemes, device=device, batch=args.batch, steps=args.steps,
                      budget_s=args.budget_s, started=started)  # fmt: skip
    summary = summarise(ops, rows)
    swapped = [m for c in cases for m in convert(c.build()).modules() if isinstance(m, MemorySavingModule)]
    covered = {t for m in swapped for t in type(m).__mro__}
    uncovered = sorted(t.__name__ for t in supported_types() if t not in covered)
    result = {
        "config": {**_environment(device), "batch": args.batch, "steps": args.steps, "tolerance": TOLERANCE,
                   "noise_floor": NOISE_FLOOR, "seconds": round(time.perf_counter() - started, 1)},
        "summary": summary, "ops": ops, "cases": rows, "op_types_not_in_op_section": uncovered,
    }  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    config = result["config"]
    where = config.get("gpu") or "CPU"
    print(f"ondevice vs stock PyTorch on {config['device']} ({where}), torch {config['torch']}, TF32 off, "
          f"batch {args.batch}, {args.steps} timed steps; {config['seconds']} s\n")  # fmt: skip
    if ops:
        print(f"Ops: {summary['op_cases_passing']}/{summary['op_cases']} cases match stock "
              f"(relative error <= {TOLERANCE:g}: 'ok', else the error)\n")  # fmt: skip
        print(render(*op_table(ops), markdown=args.markdown) + "\n")
    memory_source = "CUDA caching allocator" if device.type == "cuda" else "tensor trackers"
    print(f"Models: {summary['passing']} of {summary['model_cases']} cases pass, "
          f"{summary['refused']} refused, {summary['skipped']} skipped; models passing every scheme: "
          f"{len(summary['models_passing_every_scheme'])}. Bytes from the {memory_source}; x less act = "
          f"stock / ondevice activation bytes; x time = ondevice / stock step time\n")  # fmt: skip
    print("Per model and scheme: activation bytes, then peak bytes, stock / ondevice (every case named "
          "'pass' in the table below matched stock's gradients)\n")  # fmt: skip
    print(render(*grid_table(rows), markdown=args.markdown) + "\n")
    print(render(*model_table(rows), markdown=args.markdown))
    for item in summary["failed_ops"] + summary["failed_models"]:
        print(f"FAILED: {item}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
