"""Frozen weights in int8 against float32: accuracy, weight bytes, step peak and step time, in one run.

``prepare(model, scheme, frozen_weights="int8")`` holds every frozen Conv/Linear/Embedding weight in int8
with a float32 scale per output channel (``ondevice/quantize.py``). This compares it with the same model
holding its frozen weights in float32, each figure against the float baseline measured in the same run:

* **accuracy** on the digits transfer (``memory.transfer.run_transfer``: the backbone pretrained on digits
  0-4, cached, adapted to 5-9), with run_transfer's default settings, the same for float and int8 (nothing
  tuned for int8), over seeds 0-2: per model and scheme the mean and worst accuracy of each, and the
  difference int8 - float paired per seed (mean, and worst = the most negative). The small ``cnn`` has no
  Linear layer besides its head, so LoRA does not apply to it (its row says so); LoRA is measured on the
  zoo ViT's transfer instead. Target: int8 loses at most 0.5 points, mean over the seeds.
* **weight bytes** of a bias-only step (``memory.measure``'s ``frozen_param_bytes``: every frozen
  parameter as held, int8 weights with their scales, and the norms that stay float) on MobileNetV2-w0.35 at
  128 px, the zoo ViT of ``bench/memory.py`` and a transformers BERT built from a small config
  (``bench/library_models.py``), batch 8; also the bytes of the quantised layers' weights alone (int8 +
  scales against float32). Target: <= 0.27x.
* **peak** tensor bytes of that bias-only step on MobileNetV2 (``memory.measure``'s ``peak_bytes``).
  Target (the issue's): >= 2x lower.
* **step time** of the MobileNetV2 bias-only step (forward, cross-entropy, backward, SGD with momentum),
  float and int8 interleaved round by round with ``torch.set_num_threads(--threads)``; the ratio is the
  median over rounds of the per-round ratio of process CPU time (``bench/memory.py``'s ``time_steps``).
  Target: <= 1.3x.

Nothing here asserts a figure; the targets are reported as holding or not.

    python bench/quantize.py                                  # table (under 2 minutes on 2 cores)
    python bench/quantize.py --json                           # the same as JSON
    python bench/quantize.py --save quantize.json             # table, and the JSON written to a file
    python bench/quantize.py --quick                          # smoke test: 1 seed, 2 epochs, small inputs
    python bench/quantize.py --seeds 5 --transfers cnn/bias,vit/lora --reps 30
"""

from __future__ import annotations

import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

if __package__ in (None, ""):  # run as a script: the repository root on the path, as for bench/memory.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._transfers import grid_main, paired, pts, run_grid
from bench.library_models import LIBRARY_MODELS, library_available, logits_of
from bench.memory import time_steps, training_step
from memory import measure
from ondevice import PreparedModel, prepare
from ondevice.models import create_model
from ondevice.quantize import is_int8

MIB = 1 << 20
FORMATS = ("float", "int8")
DEFAULT_TRANSFERS = "cnn/bias,cnn/lite_residual,cnn/lora,vit/lora"
TARGETS = {"accuracy_points": 0.5, "weight_ratio": 0.27, "peak_x_lower": 2.0, "time_ratio": 1.3}


# --- accuracy on the digits transfer -------------------------------------------------------------------


def _summary(model: str, scheme: str, runs: dict[str, list[Any]], seeds: list[int],
             settings: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Mean and worst per format, and the per-seed paired difference int8 - float."""
    skipped = runs["float"][0].skipped or runs["int8"][0].skipped
    row: dict[str, Any] = {"model": model, "scheme": scheme, "seeds": seeds, **settings, "skipped": skipped}
    if skipped:
        return row
    acc = {fmt: [o.accuracy for o in runs[fmt]] for fmt in FORMATS}
    diff = paired(runs["float"], runs["int8"])
    for fmt in FORMATS:
        row[fmt] = {
            "accuracy": acc[fmt],
            "accuracy_mean": statistics.fmean(acc[fmt]),
            "accuracy_worst": min(acc[fmt]),
            "frozen_bytes": runs[fmt][0].frozen_bytes,
            "activation_bytes": runs[fmt][0].activation_bytes,
            "train_seconds": [o.train_seconds for o in runs[fmt]],
        }
    row["diff"] = diff
    row["diff_mean"] = statistics.fmean(diff)
    row["diff_worst"] = min(diff)
    row["target_holds"] = row["diff_mean"] * 100 >= -TARGETS["accuracy_points"]
    return row


def accuracy_rows(
    transfers: dict[str, list[str]], seeds: list[int], *, epochs: int | None
) -> list[dict[str, Any]]:
    """Every model/scheme of ``transfers`` adapted with float and with int8 frozen weights on each seed."""
    variants = {fmt: {"frozen_weights": fmt} for fmt in FORMATS}
    rows = []
    for model, schemes in transfers.items():
        runs, settings = run_grid(model, schemes, seeds, variants, epochs=epochs)
        rows += [_summary(model, scheme, runs[scheme], seeds, settings) for scheme in schemes]
    return rows


# --- weight bytes, peak and step time --------------------------------------------------------------------


def _bert(batch: int) -> tuple[nn.Module, Tensor, Tensor, str]:
    spec = LIBRARY_MODELS["transformers/bert"]
    model = spec.build(seed=0)
    config: Any = model.config
    description = (f"transformers BertForSequenceClassification(hidden_size={config.hidden_size}, "
                   f"num_hidden_layers={config.num_hidden_layers}, intermediate_size="
                   f"{config.intermediate_size}, vocab_size={config.vocab_size}), "
                   f"input {batch}x{spec.sequence} token ids")  # fmt: skip
    return model, spec.example(batch), spec.targets(batch), description


def byte_models(*, quick: bool, batch: int) -> dict[str, Callable[[], tuple[nn.Module, Tensor, Tensor, str]]]:
    """Builders of the models whose bytes are measured: ``(model, x, y, description)`` each."""
    resolution = 64 if quick else 128
    vit = {"image_size": 16 if quick else 32, "in_channels": 3, "patch_size": 4, "dim": 64 if quick else 128,
           "depth": 2 if quick else 6, "heads": 4, "num_classes": 10}  # fmt: skip

    def zoo(name: str, kwargs: dict[str, Any], shape: tuple[int, ...]) -> Callable[[], Any]:
        def build() -> tuple[nn.Module, Tensor, Tensor, str]:
            torch.manual_seed(0)
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(batch, *shape, generator=generator)
            y = torch.randint(0, 10, (batch,), generator=generator)
            args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
            return create_model(name, **kwargs), x, y, f"{name}({args}), input {'x'.join(map(str, x.shape))}"

        return build

    builders = {
        "mobilenetv2": zoo("mobilenetv2", {"width_mult": 0.35, "resolution": resolution, "num_classes": 10},
                           (3, resolution, resolution)),
        "vit": zoo("vit", vit, (3, vit["image_size"], vit["image_size"])),
    }  # fmt: skip
    if library_available("transformers"):
        builders["transformers/bert"] = lambda: _bert(batch)
    return builders


def _loss(output: Any, target: Tensor) -> Tensor:
    return F.cross_entropy(logits_of(output), target)


def _prepared(model: nn.Module, fmt: str, scheme: str) -> PreparedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # library layers on stock autograd: not what this measures
        prepared = prepare(model, scheme, frozen_weights=fmt)  # type: ignore[arg-type]
    return prepared.train()


def quantised_weight_bytes(prepared: PreparedModel, names: tuple[str, ...]) -> int:
    """Bytes of the weights of the layers ``names`` as ``prepared`` holds them (int8 + scales, or float)."""
    total = 0
    for name in names:
        layer: Any = prepared.model.get_submodule(name)
        tensors = (layer.weight_int8, layer.weight_scale) if is_int8(layer) else (layer.weight,)
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def byte_rows(*, quick: bool, batch: int, scheme: str = "bias") -> list[dict[str, Any]]:
    """Per model: one measured ``scheme`` step with float and with int8 frozen weights."""
    rows = []
    for name, build in byte_models(quick=quick, batch=batch).items():
        model, x, y, description = build()
        prepared = {fmt: _prepared(model, fmt, scheme) for fmt in FORMATS}
        names = prepared["int8"].int8_layers
        row: dict[str, Any] = {"model": name, "description": description, "scheme": scheme,
                               "int8_layers": len(names)}  # fmt: skip
        for fmt in FORMATS:
            report = measure(prepared[fmt], x, target=y, loss_fn=_loss)
            row[fmt] = {
                "frozen_param_bytes": report.frozen_param_bytes,
                "param_bytes": report.param_bytes,
                "activation_bytes": report.activation_bytes,
                "peak_bytes": report.peak_bytes,
                "quantised_layer_weight_bytes": quantised_weight_bytes(prepared[fmt], names),
            }
        f, q = row["float"], row["int8"]
        row["frozen_ratio"] = q["frozen_param_bytes"] / max(f["frozen_param_bytes"], 1)
        layers = "quantised_layer_weight_bytes"
        row["layer_weight_ratio"] = q[layers] / max(f[layers], 1)
        row["peak_x_lower"] = f["peak_bytes"] / max(q["peak_bytes"], 1)
        rows.append(row)
    return rows


def step_time(*, quick: bool, batch: int, reps: int, scheme: str = "bias") -> dict[str, Any]:
    """The MobileNetV2 ``scheme`` step, float and int8 interleaved; ratios int8 / float per round."""
    model, x, y, description = byte_models(quick=quick, batch=batch)["mobilenetv2"]()
    steps = {fmt: training_step(_prepared(model, fmt, scheme), (x, y)) for fmt in FORMATS}
    # time_steps takes the baseline of its ratios under the name "stock": here the float model.
    timing = time_steps({"stock": steps["float"], "int8": steps["int8"]}, reps=reps, warmup=2)
    return {
        "model": description,
        "scheme": scheme,
        "reps": reps,
        "float": {k: timing["stock"][k] for k in ("step_cpu_ms", "step_wall_ms")},
        "int8": {k: timing["int8"][k] for k in ("step_cpu_ms", "step_wall_ms")},
        "time_ratio": timing["int8"]["time_ratio"],
        "wall_ratio": timing["int8"]["wall_ratio"],
    }


# --- the run and its table -------------------------------------------------------------------------------


def verdicts(result: dict[str, Any]) -> dict[str, bool]:
    """Whether each of the issue's targets holds in ``result``."""
    rows = [r for r in result["accuracy"] if not r["skipped"]]
    mobilenet = next(r for r in result["bytes"] if r["model"] == "mobilenetv2")
    limit = TARGETS["weight_ratio"]
    return {
        "accuracy": bool(rows) and all(r["target_holds"] for r in rows),
        "weight_bytes": all(r["frozen_ratio"] <= limit for r in result["bytes"]),
        "quantised_layer_bytes": all(r["layer_weight_ratio"] <= limit for r in result["bytes"]),
        "peak": mobilenet["peak_x_lower"] >= TARGETS["peak_x_lower"],
        "step_time": result["time"]["time_ratio"] <= TARGETS["time_ratio"],
    }


def run(transfers: dict[str, list[str]], seeds: list[int], *, quick: bool, epochs: int | None, reps: int,
        threads: int, batch: int) -> dict[str, Any]:  # fmt: skip
    """The benchmark's rows as a JSON-ready dict (``grid_main`` adds its ``config`` and runs it with
    ``threads`` torch threads)."""
    result: dict[str, Any] = {
        "accuracy": accuracy_rows(transfers, seeds, epochs=epochs),
        "bytes": byte_rows(quick=quick, batch=batch),
        "time": step_time(quick=quick, batch=batch, reps=reps),
    }
    result["targets_hold"] = verdicts(result)
    return result


def print_tables(result: dict[str, Any]) -> None:
    """Rich tables of accuracy, bytes and time, and a line per target."""
    from rich.console import Console
    from rich.table import Table

    config = result["config"]
    console = Console(width=160)
    seeds = ", ".join(map(str, config["seeds"]))
    table = Table(
        title=f"Digits transfer (run_transfer's settings), float vs int8 frozen weights, seeds {seeds}",
        caption="diff = int8 - float in accuracy points, paired per seed; worst = lowest accuracy / most "
                f"negative diff; target: mean diff >= -{TARGETS['accuracy_points']} points",
    )  # fmt: skip
    left = ("model", "scheme", "diff per seed")
    for column in ("model", "scheme", "epochs", "float mean", "float worst", "int8 mean", "int8 worst",
                   "diff mean", "diff worst", "diff per seed", "frozen KiB float", "frozen KiB int8",
                   "holds"):  # fmt: skip
        table.add_column(column, justify="left" if column in left else "right", no_wrap=column in left)
    for row in result["accuracy"]:
        if row["skipped"]:
            table.add_row(row["model"], row["scheme"], "", "skipped", *[""] * 9)
            continue
        f, q = row["float"], row["int8"]
        table.add_row(row["model"], row["scheme"], str(row["epochs"]), f"{f['accuracy_mean']:.4f}",
                      f"{f['accuracy_worst']:.4f}", f"{q['accuracy_mean']:.4f}", f"{q['accuracy_worst']:.4f}",
                      pts(row["diff_mean"]), pts(row["diff_worst"]),
                      "/".join(pts(d) for d in row["diff"]), f"{f['frozen_bytes'] / 1024:.1f}",
                      f"{q['frozen_bytes'] / 1024:.1f}", "yes" if row["target_holds"] else "NO")  # fmt: skip
    console.print(table)
    for row in result["accuracy"]:
        if row["skipped"]:
            console.print(f"{row['model']}/{row['scheme']} skipped: {row['skipped']}")

    table = Table(
        title=f"Bias-only step, batch {config['batch']}, float vs int8 frozen weights (memory.measure)",
        caption="frozen = every frozen parameter as held (int8 weights + float32 scales + float norms); "
                "layers = the quantised layers' weights only; saved = what the forward keeps for backward; "
                "peak = live tensor bytes over the step, parameters included; x = int8 / float "
                "(peak: float / int8)",
    )  # fmt: skip
    for column in ("model", "int8 layers", "frozen KiB float", "frozen KiB int8", "x frozen", "x layers",
                   "params MiB float", "params MiB int8", "saved MiB float", "saved MiB int8",
                   "peak MiB float", "peak MiB int8", "x lower peak"):  # fmt: skip
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=column == "model")
    for row in result["bytes"]:
        f, q = row["float"], row["int8"]
        table.add_row(row["model"], str(row["int8_layers"]), f"{f['frozen_param_bytes'] / 1024:.1f}",
                      f"{q['frozen_param_bytes'] / 1024:.1f}", f"{row['frozen_ratio']:.3f}",
                      f"{row['layer_weight_ratio']:.3f}", f"{f['param_bytes'] / MIB:.2f}",
                      f"{q['param_bytes'] / MIB:.2f}", f"{f['activation_bytes'] / MIB:.2f}",
                      f"{q['activation_bytes'] / MIB:.2f}",
                      f"{f['peak_bytes'] / MIB:.2f}", f"{q['peak_bytes'] / MIB:.2f}",
                      f"{row['peak_x_lower']:.2f}")  # fmt: skip
    console.print(table)
    for row in result["bytes"]:
        console.print(f"{row['model']}: {row['description']}")

    timing = result["time"]
    console.print(
        f"\nStep time, {timing['model']}, {timing['scheme']}, torch.set_num_threads({config['threads']}), "
        f"{timing['reps']} interleaved rounds: float {timing['float']['step_cpu_ms']:.1f} ms CPU "
        f"({timing['float']['step_wall_ms']:.1f} wall), int8 {timing['int8']['step_cpu_ms']:.1f} ms CPU "
        f"({timing['int8']['step_wall_ms']:.1f} wall); int8 / float: {timing['time_ratio']:.2f}x CPU time "
        f"(median of per-round ratios), {timing['wall_ratio']:.2f}x wall"
    )
    holds = result["targets_hold"]
    mobilenet = next(r for r in result["bytes"] if r["model"] == "mobilenetv2")
    lines = [
        f"accuracy within {TARGETS['accuracy_points']} points of float (mean over seeds {seeds}): "
        f"{holds['accuracy']}",
        f"frozen bytes <= {TARGETS['weight_ratio']}x of float: {holds['weight_bytes']} "
        f"(quantised layers alone: {holds['quantised_layer_bytes']})",
        f"MobileNetV2 step peak >= {TARGETS['peak_x_lower']}x lower: {holds['peak']} "
        f"({mobilenet['float']['peak_bytes'] / MIB:.2f} -> {mobilenet['int8']['peak_bytes'] / MIB:.2f} MiB)",
        f"step time <= {TARGETS['time_ratio']}x of float: {holds['step_time']} ({timing['time_ratio']:.2f}x)",
    ]
    console.print("\n".join(f"target: {line}" for line in lines))
    console.print(f"{config['machine']}, torch {config['torch']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line entry point (see the module docstring)."""
    return grid_main(
        argv,
        description=(__doc__ or "").splitlines()[0],
        transfers=(DEFAULT_TRANSFERS, "cnn/bias,cnn/lite_residual,cnn/lora"),
        example="cnn/bias",
        quick_epochs=2,
        quick_help="1 seed, 2 epochs, small inputs: a smoke test",
        transfers_help=f"{DEFAULT_TRANSFERS}; the cnn rows only with --quick",
        run=run,
        print_tables=print_tables,
        targets=TARGETS,
        time_ratio="median over interleaved rounds of (int8 CPU time / float CPU time)",
    )


if __name__ == "__main__":
    main()
