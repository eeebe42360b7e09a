"""``ondevice demo``: the end-to-end job on the built-in digits.

1. detect the machine (or take ``--device``), turn its profile into a memory budget and plan the update
   scheme that fits it, with the memory report; measure every scheme against stock PyTorch;
2. pretrain a backbone (cached) and learn a class-incremental stream on the device with the planned
   scheme and a replay buffer, showing accuracy and forgetting after each experience;
3. simulate a federation of devices on Flower's Simulation Engine, sharing only their sparse updates;
4. write a report folder: Markdown + HTML with PNG plots, and every figure as JSON.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

import ondevice
from devices import detect, get_profile
from federated import FederatedConfig, prestart_engine, simulate
from memory import Budget, measure, plan
from memory.report import device_limits, explain_needed
from ondevice._version import __version__
from ondevice.cli._app import app, configure_logging, console, fail, print_json
from ondevice.cli.demo_report import write_report
from ondevice.continual import LearnerConfig, create_learner, load_scenario, run_scenario
from ondevice.errors import OnDeviceError

MEMORY_SCHEMES = ("full", "last_layer", "bias", "lite_residual", "sparse")
SEED = 0
"""Every random draw of the demo (pretraining, the stream, the learner, the federation) uses this seed."""
FEDERATED_SCHEME = {
    "name": "lite_residual",
    "expand": 0.25,
    "kernel_size": 3,
    "groups": 8,
    "downsample": 1,
    "update_norm_stats": True,
}


def _device_step(device: str | None) -> tuple[Any, Any, dict[str, Any]]:
    profile = get_profile(device) if device else detect()
    budget: Budget = profile.to_budget()  # the device's convention: frozen weights in RAM or in flash
    figures = {
        "name": profile.name,
        "kind": str(getattr(profile.kind, "value", profile.kind)),
        "description": profile.description,
        "memory_bytes": profile.memory_bytes,
        "training_budget_bytes": budget.total_bytes,
        "budget": str(budget),
        "count_frozen_params": budget.count_frozen_params,
        "frozen_param_bits": budget.frozen_param_bits,
        "detected": device is None,
    }
    return profile, budget, figures


def _plan_step(backbone: Any, budget: Any, *, batch_size: int) -> tuple[Any, dict[str, Any]]:
    chosen = plan(backbone, budget=budget, input_shape=tuple(backbone.input_shape), batch_size=batch_size)
    figures = {
        "scheme": chosen.scheme.name,
        "scheme_config": chosen.scheme.to_dict(),
        "needed_bytes": chosen.needed_bytes,
        "budget_bytes": budget.total_bytes,
        "requirement": explain_needed(chosen.report, budget),
        "exceeds_device": device_limits(chosen.report, budget),
        "batch_size": batch_size,
        "input_shape": list(backbone.input_shape),
        "table": chosen.report.to_markdown(top=8),
        "report": chosen.report.to_dict(),
    }
    return chosen.scheme, figures


def _memory_step(*, resolution: int, batch_size: int) -> list[dict[str, Any]]:
    """Measure one real training step of each scheme, stock PyTorch against ondevice."""
    import torch

    torch.manual_seed(SEED)
    model = ondevice.create_model("mobilenetv2", width_mult=0.35, resolution=resolution, num_classes=10)
    x = torch.randn(batch_size, 3, resolution, resolution)
    rows = []
    for scheme in MEMORY_SCHEMES:
        stock = measure(ondevice.prepare(model, scheme, memory_saving=False), x)
        ours = measure(ondevice.prepare(model, scheme), x)
        rows.append(
            {
                "scheme": scheme,
                "model": f"mobilenetv2-w0.35 @{resolution}px, batch {batch_size}",
                "resolution": resolution,
                "batch_size": batch_size,
                "seed": SEED,
                "stock_activation_bytes": stock.activation_bytes,
                "ondevice_activation_bytes": ours.activation_bytes,
                "stock_peak_bytes": stock.peak_bytes,
                "ondevice_peak_bytes": ours.peak_bytes,
                "trainable_param_bytes": ours.trainable_param_bytes,
            }
        )
    return rows


def _stream_step(scheme: Any, *, quick: bool, show: bool) -> dict[str, Any]:
    import torch

    scenario = load_scenario("class-incremental", seed=SEED)
    backbone = scenario.backbone(epochs=8 if quick else 20, seed=SEED)
    torch.manual_seed(SEED)
    prepared = ondevice.prepare(backbone, scheme)
    learner = create_learner(
        prepared,
        "replay",
        buffer_size=200,
        optimizer="adam",
        lr=0.01 if scheme.name == "last_layer" else 1e-3,
        config=LearnerConfig(replay_steps=1 if quick else 4, replay_batch_size=32, seed=SEED),
        seed=SEED,
    )
    correct: list[float] = []
    boundaries: list[int] = []
    labels = ["+".join(str(c) for c in e.classes) for e in scenario.experiences]

    def on_result(result: Any) -> None:
        if result.accuracy is not None:
            correct.extend([float(result.accuracy)] * int(result.samples))

    rows: list[list[float]] = []

    def on_experience(index: int, row: list[float]) -> None:
        boundaries.append(len(correct))
        rows.append(list(row))
        if show:
            seen = row[: index + 1]
            drops = [max(r[j] for r in rows[:-1]) - row[j] for j in range(index)] if index else [0.0]
            console.print(
                f"  after experience {index + 1}/{len(labels)} (digits {escape(labels[index])}): "
                f"accuracy on the digits seen so far {sum(seen) / len(seen):.3f}, "
                f"forgetting {sum(drops) / len(drops):.3f}"
            )

    result = run_scenario(
        learner, scenario, batch_size=10, seed=SEED, on_result=on_result, on_experience=on_experience
    )
    metrics = result.metrics
    return {
        "scenario": scenario.description,
        "model": scenario.model,
        "input_shape": list(backbone.input_shape),
        "batch_size": 10,
        "seed": SEED,
        "scheme": scheme.name,
        "strategy": "replay, 200 samples",
        "samples": result.samples,
        "correct": correct,
        "boundaries": boundaries[:-1],
        "matrix": [list(r) for r in metrics.accuracy_matrix],
        "experience_labels": labels,
        "acc": metrics.acc,
        "bwt": metrics.bwt,
        "avg_forgetting": metrics.avg_forgetting,
        "buffer_bytes": result.buffer_bytes,
        "samples_per_second": result.samples_per_second,
    }


def _federated_step(*, quick: bool, show: bool) -> dict[str, Any]:
    clients, rounds = (3, 2) if quick else (6, 4)

    def on_round(record: Any) -> None:
        if show:
            accuracy = "-" if record.accuracy is None else f"{record.accuracy:.3f}"
            console.print(
                f"  round {record.round}: accuracy {accuracy}, {record.accepted}/{record.replies} updates "
                f"accepted, {record.bytes_down:,} B down, {record.bytes_up:,} B up"
            )

    # Lite residual + bias in fp16 both ways, as bench/federated.py's claim row, sized for a quick demo.
    overrides = {
        "num_clients": clients,
        "rounds": rounds,
        "scheme": FEDERATED_SCHEME,
        "partition": "dirichlet:0.5",
        "lr": 1e-2,
        "local_epochs": 1,
        "compression": "fp16",
        "downlink": "fp16",
        "seed": SEED,
    }
    config = FederatedConfig.from_dict({**FederatedConfig().to_dict(), **overrides})
    result = simulate(config, on_round=on_round)
    return {
        "model": config.model,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "clients": clients,
        "scheme": "lite_residual+bias (fp16)",
        "partition": "dirichlet:0.5",
        "seconds": result.seconds,
        "final_accuracy": result.final_accuracy,
        "rounds": [r.to_dict() for r in result.rounds],
    }


def check_out_folder(out: Path) -> str | None:
    """Why ``--out`` cannot hold the report (``None`` when it can), checked before any work starts."""
    if out.exists() and not out.is_dir():
        return (
            f"--out {str(out)!r} is a file, not a folder; give a folder for the report (created if missing)"
        )
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != out and not existing.is_dir():
        return (
            f"--out {str(out)!r} cannot be created: {str(existing)!r} is a file, not a folder; give a "
            f"folder path for the report"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        return (
            f"--out {str(out)!r} is not writable ({str(existing)!r} refuses writes); give a folder you can "
            f"write to"
        )
    return None


def _settings(*, quick: bool, device: str | None) -> dict[str, Any]:
    """What the report's tables cover: the version, the date, the seed and the command's options."""
    return {
        "version": __version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seed": SEED,
        "quick": quick,
        "device": device or "detected",
    }


@app.command()
def demo(
    device: Annotated[
        str | None, typer.Option(help="Device profile to plan for (see `ondevice devices`); default: detect.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("ondevice-report"),
    quick: Annotated[bool, typer.Option("--quick", help="A fast pass (under a minute).")] = False,
    skip_federated: Annotated[bool, typer.Option("--skip-federated", help="Leave out step 3.")] = False,
    threads: Annotated[
        int,
        typer.Option(
            min=1,
            help="Torch threads in this process. The demo's models are small: one thread avoids OpenMP "
            "spinning against the simulation's worker processes.",
        ),
    ] = 1,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
) -> None:
    """Plan, learn on a stream, federate and report: the whole SDK on the built-in digits."""
    import torch

    configure_logging(verbose)
    problem = check_out_folder(out)
    if problem is not None:
        fail(problem)
        return
    if device is not None:
        try:
            get_profile(device)  # a typo fails here, before the engine starts or anything trains
        except OnDeviceError as exc:
            fail(exc)
            return
    torch.set_num_threads(threads)
    show = not json_output
    started = time.perf_counter()
    timings: dict[str, float] = {}
    figures: dict[str, Any] = {"settings": _settings(quick=quick, device=device)}
    if not skip_federated:
        prestart_engine(verbose=verbose)  # Ray's ~10 s start-up overlaps steps 1 and 2
    try:
        with console.status("[bold]1/4[/] detecting the device and planning the update scheme") as status:
            t0 = time.perf_counter()
            _profile, budget, figures["device"] = _device_step(device)
            figures["settings"]["device"] = figures["device"]["name"]

            backbone = load_scenario("class-incremental", seed=SEED).backbone(
                epochs=8 if quick else 20, seed=SEED
            )
            scheme, figures["plan"] = _plan_step(backbone, budget, batch_size=10)
            status.update("[bold]1/4[/] measuring each scheme against stock PyTorch")
            figures["memory"] = _memory_step(resolution=64 if quick else 128, batch_size=4 if quick else 8)
            timings["plan"] = time.perf_counter() - t0
        if show:
            info = figures["device"]
            frozen = (
                f" + frozen weights at {budget.frozen_param_bits} bit" if budget.count_frozen_params else ""
            )
            console.print(
                f"[bold]1/4 device[/] {escape(str(info['name']))} ({escape(str(info['description']))}), "
                f"training budget {escape(str(info['budget']))}; "
                f"planned scheme [bold]{escape(scheme.name)}[/] "
                f"needs {figures['plan']['needed_bytes']:,} B (the requirement compared with the budget: "
                f"activations + trainable state{frozen}): {escape(scheme.to_json())}"
            )
            for line in figures["plan"]["exceeds_device"]:
                console.print(f"  [yellow]exceeds the device:[/] {escape(line)}")
            for row in figures["memory"]:
                ratio = row["stock_activation_bytes"] / max(1, row["ondevice_activation_bytes"])
                console.print(
                    f"  {row['scheme']:>13}: activations "
                    f"{row['stock_activation_bytes'] / 2**20:7.2f} MiB stock -> "
                    f"{row['ondevice_activation_bytes'] / 2**20:7.3f} MiB ondevice ({ratio:.1f}x less)"
                )
            console.print("[bold]2/4 continual learning[/] on a class-incremental digit stream")
        t0 = time.perf_counter()
        figures["stream"] = _stream_step(scheme, quick=quick, show=show)
        timings["stream"] = time.perf_counter() - t0
        if show:
            s = figures["stream"]
            console.print(f"  ACC {s['acc']:.3f}, BWT {s['bwt']:+.3f}, forgetting {s['avg_forgetting']:.3f}")
        if not skip_federated:
            if show:
                console.print("[bold]3/4 federated simulation[/] on Flower's Simulation Engine")
            t0 = time.perf_counter()
            with console.status("starting the simulation engine"):
                figures["federated"] = _federated_step(quick=quick, show=show)
            timings["federated"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        files = write_report(out, figures=figures)
        timings["report"] = time.perf_counter() - t0
    except OnDeviceError as exc:
        fail(exc)
        return
    total_s = time.perf_counter() - started
    summary = {
        "report": str(files.html),
        "device": figures["device"],
        "plan": {k: v for k, v in figures["plan"].items() if k not in ("table", "report")},
        "memory": figures["memory"],
        "stream": {k: v for k, v in figures["stream"].items() if k not in ("correct",)},
        "federated": figures.get("federated"),
        "seconds": {**timings, "total": total_s},
    }
    if json_output:
        print_json(summary)
        return
    console.print(
        f"[bold]4/4 report[/] written to {escape(str(files.folder))}/ (index.html, index.md, figures.json, "
        f"plots/)"
    )
    console.print(f"done in {total_s:.0f} s")
