"""``ondevice simulate``: a federation of simulated devices on Flower's Simulation Engine."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ondevice.cli._app import app, configure_logging, console, fail, print_json
from ondevice.errors import OnDeviceError


@app.command()
def simulate(
    clients: Annotated[int, typer.Option(min=1, help="Simulated devices.")] = 10,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 5,
    scheme: Annotated[
        str, typer.Option(help="Update scheme: a name (lite_residual, full, bias, ...) or its JSON dict.")
    ] = "lite_residual",
    partition: Annotated[str, typer.Option(help="iid or dirichlet:ALPHA.")] = "dirichlet:0.3",
    model: Annotated[str, typer.Option(help="Zoo model (pretrained on digits 0-4, cached).")] = "cnn",
    local_epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round.")] = 2,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate on the devices.")] = 1e-2,
    strategy: Annotated[
        str, typer.Option(help="Device's continual learner: naive, replay, latent-replay, lwf or ewc.")
    ] = "naive",
    buffer_size: Annotated[int, typer.Option(min=1, help="Replay buffer samples per device.")] = 200,
    aggregation: Annotated[str, typer.Option(help="fedavg or fedprox.")] = "fedavg",
    mu: Annotated[
        float, typer.Option(min=0.0, help="FedProx proximal mu (with --aggregation fedprox).")
    ] = 0.0,
    server_lr: Annotated[
        float, typer.Option(min=0.0, help="Server learning rate on the averaged update (1 = FedAvg).")
    ] = 1.0,
    server_momentum: Annotated[
        float, typer.Option(min=0.0, help="Server momentum, FedAvgM (0 = FedAvg; must be < 1).")
    ] = 0.0,
    compression: Annotated[str, typer.Option(help="Uplink codec: none, fp16, int8, topk:RATIO.")] = "none",
    downlink: Annotated[str, typer.Option(help="Broadcast precision: fp32 or fp16.")] = "fp32",
    personalised: Annotated[
        bool, typer.Option("--personalised", help="Keep a local head on each device (never sent).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for splits, partition and heads.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens (Flower too).")] = False,
) -> None:
    """Simulate CLIENTS devices learning the ten digits together; report accuracy and bytes per round."""
    import logging

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    configure_logging(verbose)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    try:
        from federated import FederatedConfig
        from federated import simulate as run_simulation

        scheme_spec: object = json.loads(scheme) if scheme.strip().startswith("{") else scheme
        config = FederatedConfig(
            model=model,
            scheme=scheme_spec,
            partition=partition,
            num_clients=clients,
            rounds=rounds,
            local_epochs=local_epochs,
            lr=lr,
            strategy=strategy,  # type: ignore[arg-type]
            buffer_size=buffer_size,
            aggregation=aggregation,  # type: ignore[arg-type]
            proximal_mu=mu,
            server_lr=server_lr,
            server_momentum=server_momentum,
            compression=compression,
            downlink=downlink,  # type: ignore[arg-type]
            personalised=personalised,
            seed=seed,
        )
    except (OnDeviceError, json.JSONDecodeError) as exc:
        fail(str(exc))
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("accuracy {task.fields[accuracy]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=json_output,
    )
    task = progress.add_task("rounds", total=rounds, accuracy="-")

    def advance(record: object) -> None:
        acc = record.accuracy if record.accuracy is not None else record.client_accuracy  # type: ignore[attr-defined]
        progress.update(task, advance=1, accuracy="-" if acc is None else f"{acc:.4f}")

    try:
        with progress:
            result = run_simulation(config, on_round=advance, verbose=verbose)
    except OnDeviceError as exc:
        fail(exc)
        return
    if json_output:
        print_json(result.to_dict())
        return
    table = Table(title=f"{clients} devices, {config.scheme['name']}, {partition}, {rounds} rounds")
    for column in (
        "round",
        "accuracy",
        "device acc.",
        "accepted",
        "rejected",
        "bytes down",
        "bytes up",
        "time (s)",
    ):
        table.add_column(column, justify="right")
    from memory import format_bytes

    for r in result.rounds:
        table.add_row(
            str(r.round),
            "-" if r.accuracy is None else f"{r.accuracy:.4f}",
            "-" if r.client_accuracy is None else f"{r.client_accuracy:.4f}",
            str(r.accepted),
            str(len(r.rejected)),
            format_bytes(r.bytes_down),
            format_bytes(r.bytes_up),
            f"{r.seconds:.1f}",
        )
    console.print(table)
    console.print(f"final accuracy {result.final_accuracy}; total {result.seconds:.1f} s")
