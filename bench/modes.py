"""What the lossy and recomputing modes cost: accuracy against exact training, and step time against stock.

``prepare`` has three modes beyond its exact memory-saving ops (README, "Transformers and GELU/SiLU
networks"): ``compress="2bit"`` (2 bits per GELU/SiLU element, an approximate derivative),
``compress="int8"`` (the activation's input in 8 bits) and ``recompute=True`` (each block keeps its inputs
and runs again in backward; exact). This measures, in one run:

* **accuracy** on the digits transfer (``memory.transfer.run_transfer``: the backbone pretrained on digits
  0-4, cached, adapted to 5-9), with run_transfer's default settings and the same for every mode (nothing
  tuned per mode), over seeds 0-2: per model, scheme and mode the mean and worst accuracy, and the
  difference mode - exact paired per seed (mean, and worst = the most negative). Models: the zoo ViT
  (``vit``, GELU), ``silu_cnn`` (an EfficientNet-style CNN: the zoo's inverted residual blocks with SiLU)
  and ``hf_vit`` (transformers' ``ViTModel`` built from a small ``ViTConfig`` under a linear head), both
  registered in the zoo here (:func:`register_bench_models`) so that run_transfer pretrains and caches them
  like any zoo model. Target (issue 16): 2bit within 0.5 points of exact, mean over the seeds.
* **step time** of a bias-only step (forward, cross-entropy, backward, SGD with momentum) of the
  transformers ViT, BERT and GPT-2 and the ConvNeXt and EfficientNet configs of ``bench/library_models.py``
  under each mode, against stock PyTorch (``prepare(..., memory_saving=False)``), all variants
  interleaved round by round with ``torch.set_num_threads(--threads)``; the ratio is the median over rounds
  of the per-round ratio of process CPU time (``bench/memory.py``'s ``time_steps``). Also the bytes the step
  keeps for backward (``memory.measure``), stock / mode. Targets (issue 16): 2bit <= 1.15x stock,
  recompute <= 1.4x stock.

Nothing here asserts a figure; the targets are reported as holding or not.

    python bench/modes.py                                     # tables (13 min on 2 shared cores, first run)
    python bench/modes.py --json                              # the same as JSON
    python bench/modes.py --save modes.json                   # tables, and the JSON written to a file
    python bench/modes.py --quick                             # smoke test: 1 seed, 1 epoch, small models
    python bench/modes.py --seeds 5 --transfers vit/bias,hf_vit/lora --reps 30

The first run pretrains ``silu_cnn`` and ``hf_vit`` on digits 0-4 for each seed (cached afterwards in
``$ONDEVICE_CACHE_DIR``, else ``~/.cache/ondevice``).
"""

from __future__ import annotations

import importlib
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: the repository root on the path, as for bench/memory.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._transfers import grid_main, paired, pts, run_grid
from bench.library_models import LIBRARY_MODELS, LibraryModel, _hf, library_available, logits_of
from bench.memory import time_steps
from memory import measure
from ondevice import PreparedModel, prepare
from ondevice.models import ClassifierModel, InvertedResidual, list_models, register_model
from ondevice.models.blocks import conv_bn_act
from ondevice.pretrain import RECIPES

#: Each mode as ``run_transfer``/``prepare`` keyword arguments; "exact" is the baseline of the accuracy rows.
MODES: dict[str, dict[str, Any]] = {
    "exact": {},
    "2bit": {"compress": "2bit"},
    "int8": {"compress": "int8"},
    "recompute": {"recompute": True},
}
DEFAULT_TRANSFERS = "vit/bias,silu_cnn/bias,hf_vit/bias"
#: The zoo ViT of the accuracy rows: digits at their own 8x8, 16 patches, 32 wide, 2 blocks (kept small so
#: that 3 models x 3 seeds x 4 modes train in minutes on 2 cores).
ZOO_VIT = {"image_size": 8, "patch_size": 2, "dim": 32, "depth": 2, "heads": 2}
QUICK_TRANSFERS = "vit/bias,silu_cnn/bias"
TIME_MODELS = ("transformers/vit", "transformers/bert", "transformers/gpt2", "transformers/convnext",
               "transformers/efficientnet")  # fmt: skip
#: The same transformers at the sizes of a small on-device model (ViT-Tiny's width at 64 px, a 4-layer BERT
#: at 128 tokens), timed beside the 3-ms configs above: there per-op overhead weighs most, here arithmetic.
LARGER_TIME_MODELS: dict[str, LibraryModel] = {
    m.name: m
    for m in (
        LibraryModel(
            "transformers/vit-192x4", "transformers", "vision-transformer", "vit",
            _hf("ViTConfig", "ViTForImageClassification", image_size=64, patch_size=8, hidden_size=192,
                num_hidden_layers=4, num_attention_heads=3, intermediate_size=768, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, num_labels=10),
            resolution=64,
        ),
        LibraryModel(
            "transformers/bert-256x4", "transformers", "text-transformer", "bert",
            _hf("BertConfig", "BertForSequenceClassification", vocab_size=1000, hidden_size=256,
                num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, num_labels=3),
            classes=3, sequence=128, vocab=1000,
        ),
    )
}  # fmt: skip
TARGETS = {"accuracy_points_2bit": 0.5, "time_ratio_2bit": 1.15, "time_ratio_recompute": 1.4}
MIB = 1 << 20


# --- the models registered for the accuracy rows --------------------------------------------------------


def silu_cnn(*, num_classes: int = 10, in_channels: int = 1, resolution: int = 8) -> ClassifierModel:
    """An EfficientNet-style CNN: a SiLU stem, five of the zoo's inverted residual blocks with SiLU, a 1x1
    SiLU head convolution, global pooling (Tan & Le 2019, "EfficientNet", Table 1, without squeeze-excite)."""
    blocks = [(16, 16, 1), (16, 24, 2), (24, 24, 1), (24, 32, 2), (32, 32, 1)]
    features = nn.Sequential(
        conv_bn_act(in_channels, 16, 3, act=nn.SiLU),
        *(InvertedResidual(i, o, s, 4, act=nn.SiLU) for i, o, s in blocks),
        conv_bn_act(32, 64, 1, act=nn.SiLU),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return ClassifierModel(
        features, feature_dim=64, num_classes=num_classes, input_shape=(in_channels, resolution, resolution)
    )


class HFViTFeatures(nn.Module):
    """transformers' ``ViTModel`` (no pooler) whose class token, after its final LayerNorm, is the feature."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.vit = importlib.import_module("transformers").ViTModel(config, add_pooling_layer=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.vit(pixel_values=x).last_hidden_state[:, 0]


def hf_vit(*, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, patch_size: int = 2,
           hidden_size: int = 32, num_hidden_layers: int = 2, num_attention_heads: int = 2,
           intermediate_size: int = 64) -> ClassifierModel:  # fmt: skip
    """transformers' ViT encoder (GELU, LayerNorm, its own attention) built from a ``ViTConfig`` the size of
    the zoo ViT of these rows (:data:`ZOO_VIT`), under the zoo's linear head."""
    config = importlib.import_module("transformers").ViTConfig(
        image_size=image_size, patch_size=patch_size, num_channels=in_channels, hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return ClassifierModel(
        HFViTFeatures(config),
        feature_dim=hidden_size,
        num_classes=num_classes,
        input_shape=(in_channels, image_size, image_size),
    )


def register_bench_models() -> tuple[str, ...]:
    """Register ``silu_cnn`` and (where transformers imports) ``hf_vit`` in the zoo; the names registered.

    ``hf_vit`` pretrains with the zoo ViT's recipe (``ondevice.pretrain.RECIPES``), the CNN with the
    fallback one: 15 epochs do not get a ViT beyond about 60 % on digits 0-4."""
    builders: dict[str, Callable[..., ClassifierModel]] = {"silu_cnn": silu_cnn}
    if library_available("transformers"):
        builders["hf_vit"] = hf_vit
        RECIPES.setdefault("hf_vit", RECIPES["vit"])
    for name, factory in builders.items():
        if name not in list_models():
            register_model(name)(factory)
    return tuple(builders)


# --- accuracy on the digits transfer -------------------------------------------------------------------


def _summary(model: str, scheme: str, runs: dict[str, list[Any]], seeds: list[int],
             settings: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Mean and worst per mode, and the per-seed paired difference mode - exact."""
    skipped = next((o.skipped for outcomes in runs.values() for o in outcomes if o.skipped), None)
    row: dict[str, Any] = {"model": model, "scheme": scheme, "seeds": seeds, **settings, "skipped": skipped}
    if skipped:
        return row
    for mode, outcomes in runs.items():
        acc = [o.accuracy for o in outcomes]
        diff = paired(runs["exact"], outcomes)
        row[mode] = {
            "accuracy": acc,
            "accuracy_mean": statistics.fmean(acc),
            "accuracy_worst": min(acc),
            "diff": diff,
            "diff_mean": statistics.fmean(diff),
            "diff_worst": min(diff),
            "applied": all(_applied(mode, o) for o in outcomes),
            "activation_bytes": outcomes[0].activation_bytes,
            "train_seconds": [o.train_seconds for o in outcomes],
        }
    return row


def _applied(mode: str, outcome: Any) -> bool:
    """Whether ``mode`` changed anything for ``outcome`` (prepare leaves a model alone where it cannot)."""
    if "compress" in MODES[mode]:
        return bool(outcome.compress == MODES[mode]["compress"])
    if "recompute" in MODES[mode]:
        return bool(outcome.recomputed_blocks)
    return True


def accuracy_rows(
    transfers: dict[str, list[str]], seeds: list[int], *, epochs: int | None, **model_kwargs: Any
) -> list[dict[str, Any]]:
    """Every model/scheme of ``transfers`` adapted under each mode on each seed."""
    rows = []
    for model, schemes in transfers.items():
        runs, settings = run_grid(model, schemes, seeds, MODES, epochs=epochs,
                                  model_kwargs=model_kwargs.get(model))  # fmt: skip
        rows += [_summary(model, scheme, runs[scheme], seeds, settings) for scheme in schemes]
    return rows


# --- step time against stock -----------------------------------------------------------------------------


def _loss(output: Any, target: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits_of(output), target)


def _variant(model: nn.Module, variant: str, scheme: str) -> PreparedModel:
    """``model`` prepared as ``variant``: "stock" (memory_saving=False) or a mode of :data:`MODES`."""
    kwargs = {"memory_saving": False} if variant == "stock" else MODES[variant]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # library layers on stock autograd: reported, not what this measures
        prepared = prepare(model, scheme, **kwargs)
    return prepared.train()


def _step(model: nn.Module, x: Tensor, y: Tensor) -> Any:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _loss(model(x), y).backward()
        optimizer.step()

    return step


def time_rows(*, names: tuple[str, ...], batch: int, reps: int, scheme: str = "bias") -> list[dict[str, Any]]:
    """Per library model: every mode's step and stock's, interleaved; CPU-time ratios mode / stock."""
    rows = []
    for name in names:
        spec = LARGER_TIME_MODELS.get(name) or LIBRARY_MODELS[name]
        model = spec.build(seed=0)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = False  # a key/value cache cannot be recomputed (prepare says so)
        x, y = spec.example(batch), spec.targets(batch)
        variants = {v: _variant(model, v, scheme) for v in ("stock", *MODES)}
        row: dict[str, Any] = {"model": name, "scheme": scheme, "batch": batch, "reps": reps,
                               "input": "x".join(map(str, x.shape))}  # fmt: skip
        for variant, prepared in variants.items():
            report = measure(prepared, x, target=y, loss_fn=_loss)
            row[variant] = {
                "activation_bytes": report.activation_bytes,
                "peak_bytes": report.peak_bytes,
                "compress": prepared.compress,
                "recomputed_blocks": len(prepared.report.recompute),
            }
        timing = time_steps({v: _step(p, x, y) for v, p in variants.items()}, reps=reps, warmup=2)
        for variant in variants:
            row[variant].update(timing[variant])
            row[variant]["x_less_kept"] = row["stock"]["activation_bytes"] / max(
                row[variant]["activation_bytes"], 1
            )
        rows.append(row)
        print(f"  time {name}: " + ", ".join(f"{v} {row[v]['time_ratio']:.2f}x" for v in MODES),
              file=sys.stderr)  # fmt: skip
    return rows


# --- the run and its tables ------------------------------------------------------------------------------


def verdicts(result: dict[str, Any]) -> dict[str, bool]:
    """Whether each of the issue's targets holds in ``result``."""
    rows = [r for r in result["accuracy"] if not r["skipped"] and r["2bit"]["applied"]]
    times = result["time"]
    return {
        "accuracy_2bit": bool(rows)
        and all(r["2bit"]["diff_mean"] * 100 >= -TARGETS["accuracy_points_2bit"] for r in rows),
        "time_2bit": bool(times)
        and all(r["2bit"]["time_ratio"] <= TARGETS["time_ratio_2bit"] for r in times),
        "time_recompute": bool(times)
        and all(r["recompute"]["time_ratio"] <= TARGETS["time_ratio_recompute"] for r in times),
    }


def run(transfers: dict[str, list[str]], seeds: list[int], *, quick: bool, epochs: int | None, reps: int,
        threads: int, batch: int) -> dict[str, Any]:  # fmt: skip
    """The benchmark's rows as a JSON-ready dict, with its own settings under ``"config"`` (``grid_main``
    adds the rest and runs it with ``threads`` torch threads)."""
    registered = register_bench_models()
    names = tuple(n for n in TIME_MODELS if library_available(LIBRARY_MODELS[n].library))
    larger = tuple(n for n, m in LARGER_TIME_MODELS.items() if library_available(m.library))
    result: dict[str, Any] = {
        "config": {"modes": MODES, "registered_models": list(registered)},
        "accuracy": accuracy_rows(transfers, seeds, epochs=epochs, vit=ZOO_VIT),
        "time": time_rows(names=names[:2] if quick else (*names, *larger), batch=batch, reps=reps),
    }
    result["targets_hold"] = verdicts(result)
    return result


def print_tables(result: dict[str, Any]) -> None:
    """Rich tables of accuracy and step time, and a line per target."""
    from rich.console import Console
    from rich.table import Table

    config = result["config"]
    console = Console(width=170)
    seeds = ", ".join(map(str, config["seeds"]))
    table = Table(
        title=f"Digits transfer (run_transfer's settings), each mode against exact training, seeds {seeds}",
        caption="diff = mode - exact in accuracy points, paired per seed; worst = lowest accuracy / most "
                "negative diff; kept = bytes one step keeps for backward; * = the mode changed nothing here",
    )  # fmt: skip
    left = ("model", "scheme", "mode", "diff per seed")
    for column in ("model", "scheme", "mode", "epochs", "mean", "worst", "diff mean", "diff worst",
                   "diff per seed", "kept KiB"):  # fmt: skip
        table.add_column(column, justify="left" if column in left else "right", no_wrap=column in left)
    for row in result["accuracy"]:
        if row["skipped"]:
            table.add_row(row["model"], row["scheme"], "", "", "skipped", *[""] * 5)
            continue
        for mode in MODES:
            m = row[mode]
            mark = "" if m["applied"] else "*"
            table.add_row(row["model"], row["scheme"], mode + mark, str(row["epochs"]),
                          f"{m['accuracy_mean']:.4f}", f"{m['accuracy_worst']:.4f}", pts(m["diff_mean"]),
                          pts(m["diff_worst"]), "/".join(pts(d) for d in m["diff"]),
                          f"{m['activation_bytes'] / 1024:.1f}")  # fmt: skip
    console.print(table)
    for row in result["accuracy"]:
        if row["skipped"]:
            console.print(f"{row['model']}/{row['scheme']} skipped: {row['skipped']}")

    if result["time"]:
        first = result["time"][0]
        table = Table(
            title=f"Bias-only step against stock PyTorch (prepare(..., memory_saving=False)), "
                  f"torch.set_num_threads({config['threads']}), {first['reps']} interleaved rounds",
            caption="x time = median over rounds of mode CPU time / stock CPU time in the same round; "
                    "x less kept = stock's saved-for-backward bytes / the mode's (memory.measure)",
        )  # fmt: skip
        table.add_column("model", no_wrap=True)
        table.add_column("input", justify="right")
        table.add_column("stock ms", justify="right")
        for mode in MODES:
            table.add_column(f"{mode} x time", justify="right")
        for mode in MODES:
            table.add_column(f"{mode} x less kept", justify="right")
        for row in result["time"]:
            table.add_row(row["model"], row["input"], f"{row['stock']['step_cpu_ms']:.1f}",
                          *(f"{row[m]['time_ratio']:.2f}" for m in MODES),
                          *(f"{row[m]['x_less_kept']:.2f}" for m in MODES))  # fmt: skip
        console.print(table)
    holds = result["targets_hold"]
    lines = [
        f"2bit accuracy within {TARGETS['accuracy_points_2bit']} points of exact (mean over seeds {seeds}): "
        f"{holds['accuracy_2bit']}",
        f"2bit step time <= {TARGETS['time_ratio_2bit']}x stock: {holds['time_2bit']}",
        f"recompute step time <= {TARGETS['time_ratio_recompute']}x stock: {holds['time_recompute']}",
    ]
    console.print("\n".join(f"target: {line}" for line in lines))
    console.print(f"{config['machine']}, torch {config['torch']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line entry point (see the module docstring)."""
    return grid_main(
        argv,
        description=(__doc__ or "").splitlines()[0],
        transfers=(DEFAULT_TRANSFERS, QUICK_TRANSFERS),
        example="vit/bias",
        quick_epochs=1,
        quick_help="1 seed, 1 epoch, small inputs, two timed models: a smoke test",
        transfers_help=f"{DEFAULT_TRANSFERS}; {QUICK_TRANSFERS} on small inputs with --quick",
        run=run,
        print_tables=print_tables,
        targets=TARGETS,
        time_ratio="median over interleaved rounds of (mode CPU time / stock CPU time)",
    )


if __name__ == "__main__":
    main()
