"""``ondevice simulate``: a federation of simulated devices on Flower's Simulation Engine.

Every option left out takes :class:`federated.FederatedConfig`'s default, the one source of defaults, so
``ondevice simulate`` and ``federated.simulate()`` run the same federation. ``--help`` shows those
defaults (it imports ``federated`` only then, so that the CLI starts fast).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any

import click
import typer
from typer.core import TyperCommand

from federated import FederatedConfig
from federated import simulate as run_simulation
from memory import format_bytes
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
from ondevice.errors import OnDeviceError, UnknownNameError

__all__ = ["FLAGS", "name_flags", "simulate"]

#: FederatedConfig field -> the ``ondevice simulate`` flag that sets it.
FLAGS: dict[str, str] = {
    "num_clients": "--clients",
    "rounds": "--rounds",
    "scheme": "--scheme",
    "partition": "--partition",
    "model": "--model",
    "local_epochs": "--local-epochs",
    "lr": "--lr",
    "strategy": "--strategy",
    "buffer_size": "--buffer-size",
    "aggregation": "--aggregation",
    "proximal_mu": "--mu",
    "server_lr": "--server-lr",
    "server_momentum": "--server-momentum",
    "compression": "--compression",
    "downlink": "--downlink",
    "personalised": "--personalised",
    "frozen_weights": "--frozen-weights",
    "ship_backbone": "--ship-backbone",
    "seed": "--seed",
}


def name_flags(message: str, flags: Mapping[str, str] = FLAGS) -> str:
    """Rewrite a FederatedConfig error so that it names the CLI's flags instead of the API's fields.

    ``FederatedConfig.server_momentum`` becomes ``--server-momentum``, ``aggregation='fedprox'`` becomes
    ``--aggregation fedprox`` and a bare ``proximal_mu`` becomes ``--mu``; fields without a flag stay.
    """

    def assignment(match: re.Match[str]) -> str:
        flag = flags.get(match["field"])
        if flag is None:
            return match[0]
        value = match["value"]
        if value is None:
            return flag
        return f"{flag} {value.strip(chr(39))}"

    names = "|".join(sorted(flags, key=len, reverse=True))
    qualified = r"FederatedConfig\.(?P<field>\w+)(?:=(?P<value>'[^']*'|[^\s,;)]+))?"
    message = re.sub(qualified, assignment, message)
    message = re.sub(rf"\b(?P<field>{names})=(?P<value>'[^']*'|[^\s,;)]+)", assignment, message)
    compound = "|".join(f for f in flags if "_" in f)  # unambiguous even without a prefix
    return re.sub(rf"(?<![\w-])(?P<field>{compound})\b(?P<value>)", lambda m: flags[m["field"]], message)


def _config_error(error: OnDeviceError) -> str:
    if isinstance(error, UnknownNameError) and error.kind in FLAGS:
        return f"{FLAGS[error.kind]}: {error}"
    return name_flags(str(error))


class _ShowConfigDefaults(TyperCommand):
    """Shows FederatedConfig's defaults for the options left at ``None`` (read when help is shown)."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        defaults = FederatedConfig()
        for param in self.params:
            if param.name in FLAGS and param.default is None and isinstance(param, click.Option):
                value = getattr(defaults, param.name)
                param.show_default = str(value["name"] if param.name == "scheme" else value)
        super().format_help(ctx, formatter)


@app.command(cls=_ShowConfigDefaults)
def simulate(
    num_clients: Annotated[int | None, typer.Option("--clients", min=1, help="Simulated devices.")] = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="Federated rounds.")] = None,
    scheme: Annotated[
        str | None,
        typer.Option(help="Update scheme: a name (lite_residual, full, bias, ...) or its JSON dict."),
    ] = None,
    partition: Annotated[str | None, typer.Option(help="iid or dirichlet:ALPHA.")] = None,
    model: Annotated[str | None, typer.Option(help="Zoo model (pretrained on digits 0-4, cached).")] = None,
    local_epochs: Annotated[int | None, typer.Option(min=1, help="Local epochs per round.")] = None,
    lr: Annotated[float | None, typer.Option(min=0.0, help="Adam learning rate on the devices.")] = None,
    strategy: Annotated[
        str | None, typer.Option(help="Device's continual learner: naive, replay, latent-replay, lwf or ewc.")
    ] = None,
    buffer_size: Annotated[int | None, typer.Option(min=1, help="Replay buffer samples per device.")] = None,
    aggregation: Annotated[str | None, typer.Option(help="fedavg or fedprox.")] = None,
    proximal_mu: Annotated[
        float | None, typer.Option("--mu", min=0.0, help="FedProx proximal mu (with --aggregation fedprox).")
    ] = None,
    server_lr: Annotated[
        float | None, typer.Option(min=0.0, help="Server learning rate on the averaged update (1 = FedAvg).")
    ] = None,
    server_momentum: Annotated[
        float | None, typer.Option(min=0.0, help="Server momentum, FedAvgM (0 = FedAvg; must be < 1).")
    ] = None,
    compression: Annotated[
        str | None, typer.Option(help="Uplink codec: none, fp16, int8, topk:RATIO.")
    ] = None,
    downlink: Annotated[str | None, typer.Option(help="Broadcast precision: fp32 or fp16.")] = None,
    personalised: Annotated[
        bool | None, typer.Option("--personalised", help="Keep a local head on each device (never sent).")
    ] = None,
    frozen_weights: Annotated[
        str | None, typer.Option(help="How devices hold frozen weights: float or int8 (a quarter).")
    ] = None,
    ship_backbone: Annotated[
        bool | None,
        typer.Option("--ship-backbone", help="The server sends its frozen backbone to each device once."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for splits, partition and heads.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens (Flower too).")] = False,
) -> None:
    """Simulate devices learning the ten digits together; report accuracy and bytes per round.

    Ctrl-C stops the simulation, prints the rounds completed so far and exits with status 130.
    """
    options = dict(locals())  # the flags as typed; None: left out
    import logging

    configure_logging(verbose)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    given = {name: value for name, value in options.items() if name in FLAGS and value is not None}
    if isinstance(scheme, str) and scheme.strip().startswith("{"):
        try:
            given["scheme"] = json.loads(scheme)
        except json.JSONDecodeError as exc:
            fail(f"--scheme {scheme!r} is not valid JSON ({exc}); pass a scheme name or a JSON object")
    try:
        config = FederatedConfig(**given)
    except OnDeviceError as exc:
        fail(_config_error(exc))
    try:
        result = _run(config, json_output=json_output, verbose=verbose)
    except KeyboardInterrupt as interrupt:
        partial = getattr(interrupt, "result", None)
        if partial is None:
            say(plain("interrupted: ", "bold yellow"), "stopped before the first round")
        elif json_output:
            print_json(partial.to_dict())
        else:
            _summary(partial)
        raise typer.Exit(INTERRUPTED_EXIT_CODE) from None
    except OnDeviceError as exc:
        fail(exc)
    if json_output:
        print_json(result.to_dict())
    else:
        _summary(result)


def _run(config: Any, *, json_output: bool, verbose: bool) -> Any:
    """Run the simulation with a progress bar (or, when stderr is not a terminal, one line per round)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
    task = progress.add_task("rounds", total=config.rounds, accuracy="-")

    def advance(record: Any) -> None:
        acc = record.accuracy if record.accuracy is not None else record.client_accuracy
        shown = "-" if acc is None else f"{acc:.4f}"
        progress.update(task, advance=1, accuracy=shown)
        if not json_output and not console.is_terminal:
            sent = format_bytes(record.bytes_down + record.bytes_up)
            say(f"round {record.round}/{config.rounds}: accuracy {shown}, {sent} sent")

    with progress:
        return run_simulation(config, on_round=advance, verbose=verbose)


def _summary(result: Any) -> None:
    """The table of rounds (those completed, when interrupted) and the final line, on stderr."""
    from rich.table import Table

    config = result.config
    done = (
        f"{len(result.rounds)} of {config.rounds} rounds" if result.interrupted else f"{config.rounds} rounds"
    )
    title = f"{config.num_clients} devices, {config.scheme['name']}, {config.partition}, {done}"
    table = Table(title=plain(title))
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
    final = "-" if result.final_accuracy is None else f"{result.final_accuracy:.4f}"
    per_round = format_bytes(int(result.bytes_per_round))
    say(f"final accuracy {final}; {per_round} per round; total {result.seconds:.1f} s")
    if result.interrupted:
        say(plain("interrupted: ", "bold yellow"), f"stopped after {done} (Ctrl-C)")
