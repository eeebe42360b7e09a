"""The digits-transfer grid the accuracy rows of ``quantize.py`` and ``modes.py`` share.

Each MODEL/SCHEME is adapted with ``memory.transfer.run_transfer`` once per seed and per variant (a set of
``run_transfer`` keyword arguments: float vs int8 frozen weights, exact training vs a memory mode), with
everything else the same, so that each variant can be compared with the baseline paired per seed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from memory.transfer import SchemeOutcome, run_transfer

__all__ = ["TransferRuns", "paired", "parse_transfers", "pts", "run_grid"]

TransferRuns = dict[str, dict[str, list[SchemeOutcome]]]
"""scheme -> variant -> one outcome per seed, in seed order."""


def parse_transfers(text: str, *, example: str) -> dict[str, list[str]]:
    """``"cnn/bias,vit/lora"`` -> ``{"cnn": ["bias"], "vit": ["lora"]}`` (schemes per model, in order)."""
    out: dict[str, list[str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        model, sep, scheme = item.partition("/")
        if not sep or not model or not scheme:
            raise SystemExit(f"--transfers: {item!r} is not MODEL/SCHEME (e.g. {example})")
        out.setdefault(model, []).append(scheme)
    if not out:
        raise SystemExit(f"--transfers: give at least one MODEL/SCHEME, e.g. {example}")
    return out


def run_grid(
    model: str,
    schemes: list[str],
    seeds: list[int],
    variants: Mapping[str, Mapping[str, Any]],
    *,
    epochs: int | None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[TransferRuns, dict[str, Any]]:
    """``model``'s ``schemes`` adapted on every seed under every variant; also the settings they ran with.

    ``epochs=None`` takes ``run_transfer``'s default. Warnings about a variant that does not apply are
    silenced: each outcome says what applied. Progress goes to stderr.
    """
    if epochs is None:
        epochs = int(inspect.signature(run_transfer).parameters["epochs"].default)
    runs: TransferRuns = {s: {v: [] for v in variants} for s in schemes}
    settings: dict[str, Any] = {}
    for seed in seeds:
        for variant, kwargs in variants.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = run_transfer(model, schemes=schemes, seed=seed, epochs=epochs, **kwargs,
                                      **(model_kwargs or {}))  # fmt: skip
            settings = {"epochs": result.epochs, "optimizer": result.optimizer,
                        "model_kwargs": result.model_kwargs}  # fmt: skip
            for outcome in result.outcomes:
                runs[outcome.scheme][variant].append(outcome)
                print(f"  {model}/{outcome.scheme} seed {seed} {variant}: "
                      f"{outcome.skipped or f'{outcome.accuracy:.4f}'}", file=sys.stderr)  # fmt: skip
    return runs, settings


def paired(baseline: list[SchemeOutcome], other: list[SchemeOutcome]) -> list[float]:
    """Per seed, ``other``'s accuracy minus ``baseline``'s."""
    return [b.accuracy - a.accuracy for a, b in zip(baseline, other, strict=True)]


def pts(value: float) -> str:
    """An accuracy difference in points, signed."""
    return f"{value * 100:+.2f}"


def grid_parser(
    description: str, *, transfers_help: str, quick_epochs: int, quick_help: str
) -> argparse.ArgumentParser:
    """The command line both benches take: seeds, transfers, epochs, threads, rounds, batch, quick, output."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--seeds", type=int, default=None, help="how many seeds from --seed on (3; 1 with --quick)"
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed (0)")
    rows = f"comma-separated MODEL/SCHEME of the accuracy rows ({transfers_help})"
    parser.add_argument("--transfers", default=None, help=rows)
    epochs = f"transfer epochs (run_transfer's default, 15; {quick_epochs} with --quick)"
    parser.add_argument("--epochs", type=int, default=None, help=epochs)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the run (1)")
    parser.add_argument("--reps", type=int, default=None, help="timing rounds (15; 2 with --quick)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    parser.add_argument("--save", default="", help="also write the JSON to this file")
    parser.set_defaults(quick_epochs=quick_epochs)
    return parser


def grid_options(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The parsed arguments, and the seeds, epochs, rounds, threads and batch they stand for."""
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if seeds < 1:
        parser.error(f"--seeds must be at least 1, got {seeds}")
    return args, {
        "seeds": list(range(args.seed, args.seed + seeds)),
        "epochs": args.epochs if args.epochs is not None else (args.quick_epochs if args.quick else None),
        "reps": args.reps if args.reps is not None else (2 if args.quick else 15),
        "threads": args.threads,
        "batch": args.batch,
    }


def emit(
    result: dict[str, Any], args: argparse.Namespace, print_tables: Callable[[dict[str, Any]], None]
) -> None:
    """``--save`` writes the JSON, ``--json`` prints it, else the tables."""
    if args.save:
        Path(args.save).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_tables(result)


def grid_main(
    argv: list[str] | None,
    *,
    description: str,
    transfers: tuple[str, str],
    example: str,
    quick_epochs: int,
    quick_help: str,
    transfers_help: str,
    run: Callable[..., dict[str, Any]],
    print_tables: Callable[[dict[str, Any]], None],
    targets: dict[str, float],
    time_ratio: str,
) -> dict[str, Any]:
    """A bench's command line: parse ``argv``, run the transfers (``transfers``: the default and the
    ``--quick`` ones unless ``--transfers``) with ``--threads`` torch threads, print or save the result,
    and return it. ``run`` returns the bench's rows, and under ``"config"`` its own settings, which
    :func:`grid_config` completes with what every bench records (``targets``, ``time_ratio``)."""
    parser = grid_parser(description, transfers_help=transfers_help, quick_epochs=quick_epochs,
                         quick_help=quick_help)  # fmt: skip
    args, options = grid_options(parser, argv)
    default, quick = transfers
    chosen = parse_transfers(args.transfers or (quick if args.quick else default), example=example)
    seeds = options.pop("seeds")
    torch.set_num_threads(options["threads"])
    rows = run(chosen, seeds, quick=args.quick, **options)
    config = grid_config(chosen, seeds, quick=args.quick, reps=options["reps"], threads=options["threads"],
                         batch=options["batch"], targets=targets, time_ratio=time_ratio,
                         **rows.pop("config", {}))  # fmt: skip
    result = {"config": config, **rows}
    emit(result, args, print_tables)
    return result


def grid_config(
    transfers: dict[str, list[str]],
    seeds: list[int],
    *,
    quick: bool,
    reps: int,
    threads: int,
    batch: int,
    targets: dict[str, float],
    time_ratio: str,
    **extra: Any,
) -> dict[str, Any]:
    """The ``config`` a bench's JSON opens with: what ran, on what, against which targets."""
    return {
        "seeds": seeds,
        "transfers": {m: list(s) for m, s in transfers.items()},
        **extra,
        "batch": batch,
        "threads": threads,
        "reps": reps,
        "quick": quick,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "targets": targets,
        "time_ratio": time_ratio,
    }
