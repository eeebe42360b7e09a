"""Memory benchmark: stock PyTorch vs ondevice's memory-saving ops, per update scheme, in one run.

For each model and scheme three variants of the same prepared model train side by side:
``stock`` (``prepare(..., memory_saving=False)``, plain torch layers), ``bit`` (``prepare(...)``, 1-bit
ReLU masks) and ``byte`` (``prepare(..., mask="byte")``). For each it reports

* saved bytes: what the forward keeps for backward (``memory.measure``'s ``activation_bytes``);
* peak bytes: the most tensor bytes alive during a training step (``memory.measure``);
* RSS delta: how far the process's peak resident memory rises above its resident memory before one
  training step, in a fresh subprocess per variant (``python bench/memory.py --_case ...``);
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
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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


def _current_rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is a dependency
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark (Linux ``clear_refs`` 5); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset_worked: bool) -> int:
    if reset_worked:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_case(spec: ModelSpec, scheme: str, variant: str, *, batch: int, threads: int) -> dict[str, int]:
    """In this process: resident memory before one training step and its peak during it (bytes)."""
    torch.set_num_threads(threads)
    model, data = build(spec, scheme, variant, batch=batch)
    step = training_step(model, data)
    with torch.no_grad():
        model(data[0])  # one-time lazy initialisation (kernels, caches) outside the measured step
    gc.collect()
    reset_worked = _reset_peak_rss()
    before = _current_rss_bytes()
    step()
    peak = max(_peak_rss_bytes(reset_worked), before)
    return {"rss_before_bytes": before, "rss_peak_bytes": peak, "rss_delta_bytes": peak - before}


def rss_in_subprocess(
    model: str, scheme: str, variant: str, *, quick: bool, batch: int, threads: int
) -> dict[str, int]:
    """:func:`run_case` in a fresh interpreter (``--_case``), so each variant starts from a clean heap."""
    command = [sys.executable, str(Path(__file__).resolve()), "--_case", model, scheme, variant,
               "--batch", str(batch), "--threads", str(threads)]  # fmt: skip
    if quick:
        command.append("--quick")
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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
            "time_ratio": wall_ratio if where.type == "cuda" else statistics.median(
                a / b for a, b in zip(cpu[name], cpu["stock"], strict=True)
            ),
            "wall_ratio": wall_ratio,
        }
    return out


def _on_device(model: nn.Module, batch: Any, device: torch.device) -> tuple[nn.Module, Any]:
    return model.to(device), tuple(t.to(device) for t in batch)


def run_model_scheme(spec: ModelSpec, scheme: str, *, batch: int, reps: int, threads: int,
                     rss: dict[str, dict[str, int]] | None,
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
    figures = ("cuda_activation_bytes", "cuda_peak_bytes") if cuda else ("rss_delta_bytes",)
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
        batch: int, device: str = "cpu") -> dict[str, Any]:  # fmt: skip
    """The whole benchmark as a JSON-ready dict."""
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
        found = pool.map(lambda job: rss_in_subprocess(*job, quick=quick, batch=batch, threads=threads), jobs)
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
    memory_columns = ("CUDA act MiB", "CUDA peak MiB") if cuda else ("RSS delta MiB",)
    ratio_columns = ("x CUDA act", "x CUDA peak") if cuda else ("x RSS",)
    for column in ("model", "scheme", "variant", "saved MiB", "peak MiB", *memory_columns, "step ms",
                   "x saved", "x peak", *ratio_columns, "x time"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("model", "scheme", "variant") else "right")
    for case in result["cases"]:
        for name in VARIANTS:
            v = case["variants"][name]
            r = case["ratios"].get(name)
            keys = ("cuda_activation", "cuda_peak") if cuda else ("rss_delta",)
            ratio_cells = (
                [f"{r['saved']:.3f}", f"{r['peak']:.3f}", *(f"{r[k]:.3f}" for k in keys), f"{r['time']:.2f}"]
                if r else [""] * (3 + len(keys))
            )  # fmt: skip
            memory_cells = (
                [f"{v['cuda_activation_bytes'] / MIB:.3f}", f"{v['cuda_peak_bytes'] / MIB:.2f}"] if cuda
                else [f"{v['rss_delta_bytes'] / MIB:.1f}"]
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
    parser.add_argument("--_case", nargs=3, metavar=("MODEL", "SCHEME", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._case:
        model, scheme, variant = args._case
        spec = model_specs(quick=args.quick)[model]
        print(json.dumps(run_case(spec, scheme, variant, batch=args.batch, threads=args.threads)))
        return None
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}); "
                     f"use --device cpu")  # fmt: skip
    reps = args.reps if args.reps is not None else (2 if args.quick else 15)
    schemes = args.schemes.split(",") if args.schemes else None
    result = run(args.models.split(","), schemes, quick=args.quick, reps=reps, threads=args.threads,
                 batch=args.batch, device=args.device)  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
