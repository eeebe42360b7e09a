"""``ondevice transfer``: compare update schemes on the digits transfer task (pretrained 0-4, adapted 5-9)."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from ondevice.cli._app import app, configure_logging, console, fail, print_json
from ondevice.errors import OnDeviceError


@app.command()
def transfer(
    model: Annotated[str, typer.Option(help="Zoo model to pretrain and adapt.")] = "cnn",
    schemes: Annotated[
        str, typer.Option(help="Comma-separated update schemes to compare.")
    ] = "full,last_layer,bias,lite_residual,sparse",
    epochs: Annotated[int, typer.Option(min=1, help="Adaptation epochs per scheme.")] = 10,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed for data splits, initialisation and shuffling.")] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="A fast pass: 2 epochs per scheme.")] = False,
    compress: Annotated[
        str,
        typer.Option(help="none, or int8: keep what smooth activations save in 8 bits (lossy)."),
    ] = "none",
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
) -> None:
    """Pretrain a backbone on digits 0-4, adapt it to digits 5-9 under each scheme, and compare."""
    from rich.table import Table

    from memory import format_bytes
    from ondevice.transfer import SchemeOutcome, run_transfer

    configure_logging(verbose)
    if compress not in ("none", "int8"):
        fail(f"--compress must be 'none' or 'int8', got {compress!r}")
        return
    names = [s.strip() for s in schemes.split(",") if s.strip()]
    if quick:
        epochs = min(epochs, 2)
    started = time.perf_counter()

    def announce(outcome: SchemeOutcome) -> None:
        if not json_output:
            state = f"skipped ({outcome.skipped})" if outcome.skipped else f"accuracy {outcome.accuracy:.4f}"
            console.print(f"  [bold]{outcome.scheme}[/]: {state} in {outcome.train_seconds:.1f} s")

    try:
        if not json_output:
            console.print(f"[bold]transfer[/]: {model}, pretrained on digits 0-4, adapted to 5-9")
        result = run_transfer(
            model,
            schemes=names,
            epochs=epochs,
            lr=lr,
            seed=seed,
            progress=not json_output,
            on_outcome=announce,
            compress=None if compress == "none" else compress,
        )
    except OnDeviceError as exc:
        fail(exc)
        return
    total_s = time.perf_counter() - started
    if json_output:
        payload = result.to_dict()
        payload["total_seconds"] = total_s
        print_json(payload)
        return
    packed = ", activations int8" if result.compress else ""
    table = Table(title=f"Transfer digits 0-4 -> 5-9 ({model}, {epochs} epochs, Adam lr {lr:g}{packed})")
    for column in ("scheme", "accuracy", "trainable params", "share", "kept for backward", "train time (s)"):
        table.add_column(column, justify="left" if column == "scheme" else "right")
    for o in result.outcomes:
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
    console.print(
        f"source accuracy of the pretrained backbone: {result.source_accuracy:.4f}; total {total_s:.1f} s"
    )
