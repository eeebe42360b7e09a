"""``ondevice transfer``: compare update schemes on the digits transfer task (pretrained 0-4, adapted 5-9)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Annotated

import typer

from memory import format_bytes
from memory.transfer import SchemeOutcome, run_transfer
from ondevice.cli._app import (
    INTERRUPTED_EXIT_CODE,
    app,
    configure_logging,
    console,
    fail,
    plain,
    print_json,
    say,
)
from ondevice.errors import OnDeviceError
from ondevice.ops.registry import COMPRESS_MODES
from ondevice.schemes import list_schemes, resolve_scheme

_DEFAULT_SCHEMES = "full,last_layer,bias,lite_residual,sparse"


def _scheme_names(schemes: str) -> list[str]:
    """The ``--schemes`` list, checked before any work: non-empty, registered names, each once."""
    names = [s.strip() for s in schemes.split(",") if s.strip()]
    if not names:
        known = ", ".join(list_schemes())
        fail(f"--schemes is empty (got {schemes!r}); pass comma-separated scheme names from: {known}")
    for name in names:
        try:
            resolve_scheme(name)
        except OnDeviceError as exc:
            fail(f"--schemes: {exc}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        fail(f"--schemes {schemes!r} names {', '.join(repeated)} more than once; list each scheme once")
    return names


@app.command()
def transfer(
    model: Annotated[str, typer.Option(help="Zoo model to pretrain and adapt.")] = "cnn",
    schemes: Annotated[
        str, typer.Option(help="Comma-separated update schemes to compare.")
    ] = _DEFAULT_SCHEMES,
    epochs: Annotated[int, typer.Option(min=1, help="Adaptation epochs per scheme.")] = 10,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed for data splits, initialisation and shuffling.")] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="A fast pass: 2 epochs per scheme.")] = False,
    compress: Annotated[
        str,
        typer.Option(
            help="none; int8: keep what smooth activations (GELU, SiLU, ...) save in 8 bits; 2bit: keep 2 "
            "bits per element that pick one of 4 derivative levels. Both lossy; a ReLU network is left alone."
        ),
    ] = "none",
    recompute: Annotated[
        bool,
        typer.Option(
            "--recompute",
            help="Keep only each block's inputs and recompute the block in backward (exact, one more forward "
            "per block).",
        ),
    ] = False,
    frozen_weights: Annotated[
        str,
        typer.Option(help="float, or int8: hold the frozen Conv/Linear/Embedding weights in int8 (lossy)."),
    ] = "float",
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
) -> None:
    """Pretrain a backbone on digits 0-4, adapt it to digits 5-9 under each scheme, and compare.

    Ctrl-C stops it, prints the schemes finished so far and exits with status 130.
    """
    configure_logging(verbose)
    if compress != "none" and compress not in COMPRESS_MODES:
        allowed = ", ".join(repr(mode) for mode in ("none", *COMPRESS_MODES))
        fail(f"--compress must be one of {allowed}, got {compress!r}")
    if frozen_weights not in ("float", "int8"):
        fail(f"--frozen-weights must be 'float' or 'int8', got {frozen_weights!r}")
    names = _scheme_names(schemes)
    if quick:
        epochs = min(epochs, 2)
    started = time.perf_counter()
    finished: list[SchemeOutcome] = []

    def announce(outcome: SchemeOutcome) -> None:
        finished.append(outcome)
        if not json_output:
            state = f"skipped ({outcome.skipped})" if outcome.skipped else f"accuracy {outcome.accuracy:.4f}"
            say("  ", plain(outcome.scheme, "bold"), f": {state} in {outcome.train_seconds:.1f} s")

    if not json_output:
        say(plain("transfer", "bold"), f": {model}, pretrained on digits 0-4, adapted to 5-9")
    try:
        # stdout holds only --json output: progress bars drawn by the library go to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            result = run_transfer(
                model,
                schemes=names,
                epochs=epochs,
                lr=lr,
                seed=seed,
                progress=not json_output,
                on_outcome=announce,
                compress=None if compress == "none" else compress,  # type: ignore[arg-type]
                frozen_weights=frozen_weights,
                recompute=recompute,
            )
    except KeyboardInterrupt:
        done = ", ".join(o.scheme for o in finished) or "none"
        spent_s = time.perf_counter() - started
        say(
            plain("interrupted: ", "bold yellow"),
            f"{len(finished)} of {len(names)} schemes finished ({done}) in {spent_s:.1f} s",
        )
        if json_output:
            print_json({"interrupted": True, "outcomes": [_outcome_dict(o) for o in finished]})
        elif finished:
            _table(finished, f"Transfer digits 0-4 -> 5-9 ({model}, {epochs} epochs), interrupted")
        raise typer.Exit(INTERRUPTED_EXIT_CODE) from None
    except OnDeviceError as exc:
        fail(exc)
    total_s = time.perf_counter() - started
    if json_output:
        payload = result.to_dict()
        payload["total_seconds"] = total_s
        print_json(payload)
        return
    packed = (
        (f", activations {result.compress}" if result.compress else "")
        + (", frozen weights int8" if result.frozen_weights == "int8" else "")
        + (", blocks recomputed" if result.recompute else "")
    )
    _table(result.outcomes, f"Transfer digits 0-4 -> 5-9 ({model}, {epochs} epochs, Adam lr {lr:g}{packed})")
    for note in result.mode_notes():
        say(plain("note: ", "bold yellow"), note)
    say(f"source accuracy of the pretrained backbone: {result.source_accuracy:.4f}; total {total_s:.1f} s")


def _outcome_dict(outcome: SchemeOutcome) -> dict[str, object]:
    from dataclasses import asdict

    return asdict(outcome)


def _table(outcomes: list[SchemeOutcome] | tuple[SchemeOutcome, ...], title: str) -> None:
    from rich.table import Table

    table = Table(title=plain(title))
    for column in ("scheme", "accuracy", "trainable params", "share", "kept for backward", "train time (s)"):
        table.add_column(column, justify="left" if column == "scheme" else "right")
    for o in outcomes:
        if o.skipped:
            table.add_row(o.scheme, "skipped", "-", "-", "-", "-")
            continue
        share = o.trainable_params / max(1, o.total_params)
        kept = "-" if o.activation_bytes is None else format_bytes(o.activation_bytes)
        table.add_row(
            o.scheme,
            f"{o.accuracy:.4f}",
            f"{o.trainable_params:,}",
            f"{share:.2%}",
            kept,
            f"{o.train_seconds:.1f}",
        )
    console.print(table)
