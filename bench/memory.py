"""Memory benchmark: stock PyTorch vs ondevice's memory-saving ops, per update scheme, in one run.

For each model and scheme three variants of the same prepared model train side by side:
``stock`` (``prepare(..., memory_saving=False)``, plain torch layers), ``bit`` (``prepare(...)``, 1-bit
ReLU masks) and ``byte`` (``prepare(..., mask="byte")``). For each it reports

* saved bytes: what the forward keeps for backward (``memory.measure``'s ``activation_bytes``);
* peak bytes: the most tensor bytes alive during a training step (``memory.measure``);
* process RSS: in a fresh subprocess per variant (``python bench/memory.py --_case ...``), the peak RSS
  and how far it rises above ``import torch, ondevice, memory`` over ``--rss-steps`` (10) training steps,
  stock under torch's defaults and ondevice under the SDK's process policy (``memory.process``);
* step time: forward + cross-entropy + backward + SGD step, the three variants interleaved round by round
  (so machine load hits them alike), median over the rounds, with ``torch.set_num_threads(--threads)``;
  the ratio is the median of the per-round ratios of process CPU time (wall time is shown as well).

and the ratios ondevice / stock. With ``--device cuda`` the models train on the GPU: the RSS columns give
way to the CUDA caching allocator's exact figures from ``memory.measure`` (how much the forward grows
``torch.cuda.memory_allocated()``, and ``max_memory_allocated()`` over the step, each variant alone on the
device after a warm-up step), and step time is wall time with the device synchronised around each step
(its ratio is the median of per-round wall-time ratios).

Models: MobileNetV2-w0.35 at 128 px, batch 8 (schemes full, last_layer, bias, lite_residual, sparse) and
the zoo ViT at 32 px, 3 channels, 4x4 patches, dim 128, depth 6, 4 heads,
batch 8 (schemes full, last_layer, bias, sparse, lora).

    python bench/memory.py                       # table
    python bench/memory.py --json                # machine-readable
    python bench/memory.py --quick               # smoke test: small inputs, 2 rounds
    python bench/memory.py --models mobilenetv2 --schemes bias,sparse --threads 2 --reps 30
    python bench/memory.py --device cuda         # on a GPU: the allocator's figures side by side
    python bench/memory.py --ablation            # RSS of bias-only MobileNetV2 under each process setting
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

VARIANTS = ("stock", "bit", "byte")
MIB = 1 << 20
CUDA_KEYS = ("cuda_activation_bytes", "cuda_peak_bytes", "cuda_reserved_bytes")


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: zoo name, constructor arguments, input shape (without batch) and schemes."""

    name: str
    kwargs: dict[str, Any]
    input_shape: tuple[int, ...]
    schemes: tuple[str, ...]

    def describe(self, batch: int) -> str:
        """One line naming the model, its size and the batch shape."""
        args = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.name}({args}), input {batch}x{'x'.join(map(str, self.input_shape))}"


def model_specs(*, quick: bool) -> dict[str, ModelSpec]:
    """The benchmark models; ``quick`` shrinks inputs and the ViT for a smoke test."""
    resolution = 64 if quick else 128
    vit_size = 16 if quick else 32
    vit_kwargs: dict[str, Any] = {"image_size": vit_size, "in_channels": 3, "patch_size": 4,
                                  "dim": 64 if quick else 128, "depth": 2 if quick else 6, "heads": 4,
                                  "num_classes": 10}  # fmt: skip
    return {
        "mobilenetv2": ModelSpec(
            "mobilenetv2",
            {"width_mult": 0.35, "resolution": resolution, "num_classes": 10},
            (3, resolution, resolution),
            ("full", "last_layer", "bias", "lite_residual", "sparse"),
        ),
        "vit": ModelSpec(
            "vit", vit_kwargs, (3, vit_size, vit_size), ("full", "last_layer", "bias", "sparse", "lora")
        ),
    }


def build(spec: ModelSpec, scheme: str, variant: str, *, batch: int, seed: int = 0) -> tuple[nn.Module, Any]:
    """The prepared model of ``variant`` (in training mode) and one seeded batch ``(x, y)``."""
    import ondevice
    from ondevice.models import create_model

    torch.manual_seed(seed)
    base = create_model(spec.name, **spec.kwargs)
    if variant == "stock":
        model = ondevice.prepare(base, scheme, memory_saving=False)
    else:
        model = ondevice.prepare(base, scheme, mask=variant)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *spec.input_shape, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    return model, (x, y)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(model: nn.Module, batch: Any) -> Callable[[], None]:
    """A closure running one step: forward, cross-entropy, backward, SGD (momentum) step."""
    x, y = batch
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


@dataclass(frozen=True)
class ProcessSettings:
    """How a subprocess case runs: glibc's mmap threshold, oneDNN, a trim after each step, the optimizer.

    ``optimizer="sdk"`` is the SGD the SDK's Trainer and Learner build on CPU
    (:class:`ondevice.optim.LeanSGD`: ``torch.optim.SGD``'s update bit for bit, without importing
    ``torch._dynamo``); ``"torch"`` is ``torch.optim.SGD`` itself, whose construction imports
    ``torch._dynamo`` (about 70 MiB of RSS, see bench/README.md).
    """

    mmap_threshold_bytes: int | None = None
    mkldnn: bool = True
    trim: bool = False
    optimizer: str = "sdk"

    def label(self) -> str:
        mmap = (
            f"mmap {self.mmap_threshold_bytes // 1024} KiB" if self.mmap_threshold_bytes else "mmap dynamic"
        )
        parts = [mmap, "oneDNN" if self.mkldnn else "native conv", "trim" if self.trim else "no trim",
                 f"{self.optimizer} SGD"]  # fmt: skip
        return ", ".join(parts)


TORCH_DEFAULTS = ProcessSettings()
SDK_POLICY = ProcessSettings(mmap_threshold_bytes=128 * 1024, mkldnn=False, trim=True)
ABLATION = {
    "torch defaults": TORCH_DEFAULTS,
    "+ trim": ProcessSettings(trim=True),
    "+ native conv": ProcessSettings(mkldnn=False),
    "+ mmap 1 MiB": ProcessSettings(mmap_threshold_bytes=1 << 20),
    "+ mmap 128 KiB": ProcessSettings(mmap_threshold_bytes=128 * 1024),
    "mmap 128 KiB + trim": ProcessSettings(mmap_threshold_bytes=128 * 1024, trim=True),
    "SDK policy": SDK_POLICY,
    "SDK policy, torch.optim": ProcessSettings(
        mmap_threshold_bytes=128 * 1024, mkldnn=False, trim=True, optimizer="torch"
    ),
}


def run_case(spec: ModelSpec, scheme: str, variant: str, *, batch: int, threads: int, steps: int,
             settings: ProcessSettings) -> dict[str, Any]:  # fmt: skip
    """In this process, just after ``import torch, ondevice, memory``: RSS over ``steps`` training steps.

    Reported (bytes unless named otherwise): ``rss_import_bytes`` (RSS after the imports, before anything
    else), ``rss_peak_bytes`` (the process's peak RSS from then on: model construction and every step),
    ``rss_added_bytes`` (peak minus import), ``rss_first_step_added_bytes`` (the same after the first step),
    ``rss_current_added_bytes`` (RSS after the last step minus import), ``rss_code_bytes`` (how much of the
    RSS now is file-backed beyond the import's: kernel code paged in from the torch libraries) and
    ``rss_step_cpu_ms`` (median CPU time of the steps after the first).
    """
    from memory import process
    from ondevice.optim import LeanSGD

    torch.set_num_threads(threads)
    import_bytes = process.current_rss_bytes()
    import_file = process.rss_parts().get("file", 0)
    process.reset_peak_rss()
    if settings.mmap_threshold_bytes is not None:
        process.set_mmap_threshold(settings.mmap_threshold_bytes)
    torch.backends.mkldnn.enabled = settings.mkldnn
    model, (x, y) = build(spec, scheme, variant, batch=batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    sgd = torch.optim.SGD if settings.optimizer == "torch" else LeanSGD
    update = sgd(trainable, lr=1e-6, momentum=0.9).step
    cpu_ms: list[float] = []
    first_step = 0
    for i in range(steps):
        c0 = time.process_time()
        for p in trainable:
            p.grad = None
        F.cross_entropy(model(x), y).backward()
        update()
        if settings.trim:
            process.trim()
        cpu_ms.append((time.process_time() - c0) * 1e3)
        if i == 0:
            first_step = process.peak_rss_bytes()
    # The kernel's RSS counters are per-CPU approximations: two reads of VmHWM can differ by a few pages
    # downwards. A peak is a maximum, so the later reading never reports less than the earlier one.
    peak = max(process.peak_rss_bytes(), first_step)
    return {
        "rss_import_bytes": import_bytes,
        "rss_peak_bytes": peak,
        "rss_added_bytes": peak - import_bytes,
        "rss_first_step_added_bytes": first_step - import_bytes,
        "rss_current_added_bytes": process.current_rss_bytes() - import_bytes,
        "rss_code_bytes": max(0, process.rss_parts().get("file", 0) - import_file),
        "rss_step_cpu_ms": statistics.median(cpu_ms[1:] or cpu_ms),
    }


def rss_in_subprocess(
    model: str, scheme: str, variant: str, *, quick: bool, batch: int, threads: int, steps: int,
    settings: ProcessSettings,
) -> dict[str, Any]:  # fmt: skip
    """:func:`run_case` in a fresh interpreter (``--_case``), so each variant starts from a clean heap."""
    command = [sys.executable, str(Path(__file__).resolve()), "--_case", model, scheme, variant,
               "--batch", str(batch), "--threads", str(threads), "--rss-steps", str(steps),
               "--_settings", json.dumps(asdict(settings))]  # fmt: skip
    if quick:
        command.append("--quick")
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def time_steps(
    steps: dict[str, Callable[[], None]], *, reps: int, warmup: int = 2, device: torch.device | None = None
) -> dict[str, dict[str, float]]:
    """Interleaved timing: every round runs each variant once.

    Per variant: the median wall and CPU milliseconds, and the medians over rounds of its CPU-time and
    wall-time ratios to ``stock`` in the same round (so load that comes and goes hits both alike). On a
    CUDA ``device`` each step is synchronised before and after, and ``time_ratio`` is the wall-time ratio
    (the host's CPU time says little about the GPU's work).
    """
    where = device if device is not None else torch.device("cpu")
    for _ in range(warmup):
        for step in steps.values():
            step()
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for name, step in steps.items():
            _synchronize(where)
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            _synchronize(where)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    out: dict[str, dict[str, float]] = {}
    for name in steps:
        wall_ratio = statistics.median(a / b for a, b in zip(wall[name], wall["stock"], strict=True))
        out[name] = {
            "step_wall_ms": statistics.median(wall[name]) * 1e3,
            "step_cpu_ms": statistics.median(cpu[name]) * 1e3,
            "time_ratio": wall_ratio
            if where.type == "cuda"
            else statistics.median(a / b for a, b in zip(cpu[name], cpu["stock"], strict=True)),
            "wall_ratio": wall_ratio,
        }
    return out


def _on_device(model: nn.Module, batch: Any, device: torch.device) -> tuple[nn.Module, Any]:
    return model.to(device), tuple(t.to(device) for t in batch)


def run_model_scheme(spec: ModelSpec, scheme: str, *, batch: int, reps: int, threads: int,
                     rss: dict[str, dict[str, Any]] | None,
                     device: torch.device | None = None) -> dict[str, Any]:  # fmt: skip
    """All figures of one model and scheme: per variant, and ratios of bit/byte to stock.

    On a CUDA ``device`` (``rss`` is then None) each variant is measured alone on the device after one
    warm-up step, and the allocator's figures replace the RSS ones.
    """
    from memory import measure

    where = device if device is not None else torch.device("cpu")
    cuda = where.type == "cuda"
    built = {v: build(spec, scheme, v, batch=batch) for v in VARIANTS}
    variants: dict[str, dict[str, Any]] = {}
    for name, (model, data) in built.items():
        model, (x, y) = _on_device(model, data, where)
        if cuda:
            training_step(model, (x, y))()  # library workspaces are allocated by the first step
            model.zero_grad(set_to_none=True)
            gc.collect()
        report = measure(model, x, target=y)
        variants[name] = {"saved_bytes": report.activation_bytes, "peak_bytes": report.peak_bytes}
        if cuda:
            variants[name].update({key: getattr(report, key) for key in CUDA_KEYS})
            model.to("cpu")
        else:
            variants[name].update(rss[name] if rss is not None else {})
    on_device = {name: _on_device(m, data, where) for name, (m, data) in built.items()}
    steps = {name: training_step(m, data) for name, (m, data) in on_device.items()}
    timing = time_steps(steps, reps=reps, warmup=1 if reps < 5 else 2, device=where)
    for name in VARIANTS:
        variants[name].update(timing[name])
    stock = variants["stock"]
    figures = ("cuda_activation_bytes", "cuda_peak_bytes") if cuda else ("rss_added_bytes",)
    if not cuda:
        for figures_of in variants.values():
            figures_of["rss_over_tensor_peak"] = figures_of["rss_added_bytes"] / max(
                figures_of["peak_bytes"], 1
            )
    ratios = {
        name: {
            "saved": variants[name]["saved_bytes"] / max(stock["saved_bytes"], 1),
            "peak": variants[name]["peak_bytes"] / max(stock["peak_bytes"], 1),
            **{key.removesuffix("_bytes"): variants[name][key] / max(stock[key], 1) for key in figures},
            "time": variants[name]["time_ratio"],
            "wall": variants[name]["wall_ratio"],
        }
        for name in ("bit", "byte")
    }
    if cuda:
        for model, _ in on_device.values():
            model.to("cpu")
        torch.cuda.empty_cache()
    return {"model": spec.name, "scheme": scheme, "variants": variants, "ratios": ratios}


def run(models: list[str], schemes: list[str] | None, *, quick: bool, reps: int, threads: int,
        batch: int, device: str = "cpu", rss_steps: int = 10,
        policy: str = "sdk") -> dict[str, Any]:  # fmt: skip
    """The whole benchmark as a JSON-ready dict.

    ``policy="sdk"`` runs the ondevice variants' RSS cases under the SDK's process policy
    (:data:`SDK_POLICY`, what ``memory.process.lean_process`` plus a trim per step apply) and stock under
    torch's defaults; ``"none"`` runs every variant under torch's defaults.
    """
    torch.set_num_threads(threads)
    where = torch.device(device)
    specs = model_specs(quick=quick)
    unknown = [m for m in models if m not in specs]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {sorted(specs)}")
    plan = [(specs[m], s) for m in models for s in specs[m].schemes if schemes is None or s in schemes]
    if not plan:
        raise SystemExit(f"no scheme of {models} matches --schemes {schemes}")
    jobs = [(spec.name, scheme, v) for spec, scheme in plan for v in VARIANTS] if where.type == "cpu" else []
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        found = pool.map(
            lambda job: rss_in_subprocess(
                *job,
                quick=quick,
                batch=batch,
                threads=threads,
                steps=rss_steps,
                settings=SDK_POLICY if policy == "sdk" and job[2] != "stock" else TORCH_DEFAULTS,
            ),
            jobs,
        )
        rss_of = dict(zip(jobs, found, strict=True))
    cases = []
    for spec, scheme in plan:
        rss = {v: rss_of[(spec.name, scheme, v)] for v in VARIANTS} if rss_of else None
        cases.append(run_model_scheme(spec, scheme, batch=batch, reps=reps, threads=threads, rss=rss,
                                      device=where))  # fmt: skip
    config = {
        "models": {spec.name: spec.describe(batch) for spec in {s.name: s for s, _ in plan}.values()},
        "batch": batch,
        "threads": threads,
        "reps": reps,
        "quick": quick,
        "torch": torch.__version__,
        "time_ratio": "median over interleaved rounds of (variant CPU time / stock CPU time)",
        "device": str(where),
        "rss_steps": rss_steps,
        "rss_settings": {
            "stock": TORCH_DEFAULTS.label(),
            "ondevice": (SDK_POLICY if policy == "sdk" else TORCH_DEFAULTS).label(),
        },
    }
    if where.type == "cuda":
        config["gpu"] = torch.cuda.get_device_name(where)
        config["time_ratio"] = "median over interleaved rounds of (variant wall time / stock wall time)"
    return {"config": config, "cases": cases}


def print_table(result: dict[str, Any]) -> None:
    """A rich table of every case, variant and ratio."""
    from rich.console import Console
    from rich.table import Table

    config = result["config"]
    cuda = config.get("device", "cpu").startswith("cuda")
    where = (f"on {config['device']} ({config.get('gpu', '')}), wall time synchronised" if cuda
             else f"torch.set_num_threads({config['threads']})")  # fmt: skip
    table = Table(
        title=(f"Training-step memory and time, stock PyTorch vs ondevice (batch {config['batch']}, "
               f"{where}, {config['reps']} interleaved rounds)"),
        caption=("x = ondevice / stock; CUDA act = growth of the allocator's memory_allocated() over the "
                 "forward, CUDA peak = its max_memory_allocated() over the step; time ratio = median over "
                 "rounds of wall-time ratios") if cuda else
                "x = ondevice / stock; time ratio = median over rounds of CPU-time ratios",
    )  # fmt: skip
    memory_columns = ("CUDA act MiB", "CUDA peak MiB") if cuda else ("RSS peak MiB", "+RSS MiB", "+RSS/peak")
    ratio_columns = ("x CUDA act", "x CUDA peak") if cuda else ("x +RSS",)
    for column in ("model", "scheme", "variant", "saved MiB", "peak MiB", *memory_columns, "step ms",
                   "x saved", "x peak", *ratio_columns, "x time"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("model", "scheme", "variant") else "right")
    for case in result["cases"]:
        for name in VARIANTS:
            v = case["variants"][name]
            r = case["ratios"].get(name)
            keys = ("cuda_activation", "cuda_peak") if cuda else ("rss_added",)
            ratio_cells = (
                [f"{r['saved']:.3f}", f"{r['peak']:.3f}", *(f"{r[k]:.3f}" for k in keys), f"{r['time']:.2f}"]
                if r else [""] * (3 + len(keys))
            )  # fmt: skip
            memory_cells = (
                [f"{v['cuda_activation_bytes'] / MIB:.3f}", f"{v['cuda_peak_bytes'] / MIB:.2f}"] if cuda
                else [f"{v['rss_peak_bytes'] / MIB:.0f}", f"{v['rss_added_bytes'] / MIB:.1f}",
                      f"{v['rss_over_tensor_peak']:.2f}"]
            )  # fmt: skip
            table.add_row(
                case["model"] if name == "stock" else "",
                case["scheme"] if name == "stock" else "",
                name,
                f"{v['saved_bytes'] / MIB:.3f}",
                f"{v['peak_bytes'] / MIB:.2f}",
                *memory_cells,
                f"{v['step_wall_ms']:.1f}",
                *ratio_cells,
                end_section=name == "byte",
            )
    console = Console(width=max(132, Console().width))
    for model, description in config["models"].items():
        console.print(f"{model}: {description}")
    console.print(table)


def ablation(*, quick: bool, batch: int, threads: int, steps: int) -> dict[str, Any]:
    """Peak RSS added over the import by MobileNetV2 bias-only (1-bit masks) under each of :data:`ABLATION`,
    and stock under torch's defaults and under the SDK's policy, each in a fresh subprocess, one at a time;
    with the tensor peak of ``memory.measure`` for scale."""
    from memory import measure

    spec = model_specs(quick=quick)["mobilenetv2"]
    rows = {label: rss_in_subprocess(spec.name, "bias", "bit", quick=quick, batch=batch, threads=threads,
                                     steps=steps, settings=settings)
            for label, settings in ABLATION.items()}  # fmt: skip
    for label, settings in (("stock, torch defaults", TORCH_DEFAULTS), ("stock, SDK policy", SDK_POLICY)):
        rows[label] = rss_in_subprocess(spec.name, "bias", "stock", quick=quick, batch=batch, threads=threads,
                                        steps=steps, settings=settings)  # fmt: skip
    peaks = {}
    for variant in ("bit", "stock"):
        model, (x, y) = build(spec, "bias", variant, batch=batch)
        peaks[variant] = measure(model, x, target=y).peak_bytes
    settings_of = {k: v.label() for k, v in ABLATION.items()}
    settings_of.update(
        {"stock, torch defaults": TORCH_DEFAULTS.label(), "stock, SDK policy": SDK_POLICY.label()}
    )
    return {"config": {"model": spec.describe(batch), "scheme": "bias", "threads": threads, "steps": steps,
                       "tensor_peak_bytes": peaks, "torch": torch.__version__},
            "rows": {k: {"settings": settings_of[k], **v} for k, v in rows.items()}}  # fmt: skip


def print_ablation(found: dict[str, Any]) -> None:
    """The ablation as a table: each setting's RSS figures and ratios to the torch-defaults row."""
    from rich.console import Console
    from rich.table import Table

    config = found["config"]
    peaks = config["tensor_peak_bytes"]
    table = Table(
        title=(
            f"RSS of {config['steps']} bias-only steps, {config['model']}, {config['threads']} thread(s); "
            f"tensor peak: ondevice {peaks['bit'] / MIB:.1f} MiB, stock {peaks['stock'] / MIB:.1f} MiB"
        ),
        caption=(
            "+RSS = peak RSS above `import torch, ondevice`; code = file-backed pages added; "
            "x = this row / torch defaults (ondevice rows) or / stock, torch defaults"
        ),
    )
    for column in ("setting", "peak MiB", "+RSS MiB", "+RSS/tensor peak", "after 1st step", "now MiB",
                   "code MiB", "CPU ms/step", "x +RSS", "x CPU"):  # fmt: skip
        table.add_column(column, justify="left" if column == "setting" else "right")
    rows = found["rows"]
    for label, row in rows.items():
        stock = label.startswith("stock")
        base = rows["stock, torch defaults" if stock else "torch defaults"]
        table.add_row(label, f"{row['rss_peak_bytes'] / MIB:.0f}", f"{row['rss_added_bytes'] / MIB:.1f}",
                      f"{row['rss_added_bytes'] / peaks['stock' if stock else 'bit']:.2f}",
                      f"{row['rss_first_step_added_bytes'] / MIB:.1f}",
                      f"{row['rss_current_added_bytes'] / MIB:.1f}", f"{row['rss_code_bytes'] / MIB:.1f}",
                      f"{row['rss_step_cpu_ms']:.0f}",
                      f"{row['rss_added_bytes'] / max(base['rss_added_bytes'], 1):.2f}",
                      f"{row['rss_step_cpu_ms'] / max(base['rss_step_cpu_ms'], 1e-9):.2f}")  # fmt: skip
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenetv2,vit", help="comma-separated: mobilenetv2, vit")
    parser.add_argument("--schemes", default=None, help="comma-separated subset of each model's schemes")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every step (1)")
    parser.add_argument("--reps", type=int, default=None, help="timing rounds (15; 2 with --quick)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="small inputs and 2 rounds, for a smoke test")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--rss-steps", type=int, default=10, help="training steps per RSS case (10)")
    parser.add_argument(
        "--policy",
        choices=("sdk", "none"),
        default="sdk",
        help="process settings of the ondevice RSS cases: the SDK's (default) or torch's",
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="RSS of MobileNetV2 bias (bit masks) under each process setting, then stock",
    )
    parser.add_argument("--_settings", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_case", nargs=3, metavar=("MODEL", "SCHEME", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._case:
        model, scheme, variant = args._case
        import memory  # noqa: F401  (the baseline is `import torch, ondevice, memory`)
        import ondevice  # noqa: F401

        spec = model_specs(quick=args.quick)[model]
        settings = ProcessSettings(**json.loads(args._settings)) if args._settings else TORCH_DEFAULTS
        print(json.dumps(run_case(spec, scheme, variant, batch=args.batch, threads=args.threads,
                                  steps=args.rss_steps, settings=settings)))  # fmt: skip
        return None
    if args.ablation:
        found = ablation(quick=args.quick, batch=args.batch, threads=args.threads, steps=args.rss_steps)
        print(json.dumps(found, indent=2)) if args.json else print_ablation(found)
        return found
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}); "
                     f"use --device cpu")  # fmt: skip
    reps = args.reps if args.reps is not None else (2 if args.quick else 15)
    schemes = args.schemes.split(",") if args.schemes else None
    result = run(args.models.split(","), schemes, quick=args.quick, reps=reps, threads=args.threads,
                 batch=args.batch, device=args.device, rss_steps=args.rss_steps,
                 policy=args.policy)  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
