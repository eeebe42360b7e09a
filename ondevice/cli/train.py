"""``ondevice train``: continual learning on a digits scenario or on a data file, with a summary."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from ondevice.cli._app import app, configure_logging, console, fail, print_json
from ondevice.errors import OnDeviceError

_HELP = """Learn continually from a stream, seeing each sample once, and report what was kept.

Either a built-in scenario on the shipped digits (--scenario; the backbone is pretrained on held-out
samples that are never part of the stream) or your own data (--data). A data file is a .csv
(comma-separated, an optional header line) or a .npy 2-D array with one sample per row: the LAST column
is the integer label, every other column is a feature. It is streamed in file order; a model is built
for it from scratch (cnn1d over the features as a series, or cnn when their count is a square) and
trained under --scheme (default full).
"""


@app.command("train", help=_HELP)
def train(
    scenario: Annotated[
        str | None,
        typer.Option(
            help="class-incremental | domain-incremental | sensor (mutually exclusive with --data)."
        ),
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="A .csv or .npy file: last column the label, the rest the features.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Zoo model (default: the scenario's, cnn1d for --data).")
    ] = None,
    scheme: Annotated[
        str | None, typer.Option(help="Update scheme (default: last_layer for scenarios, full for --data).")
    ] = None,
    strategy: Annotated[str, typer.Option(help="naive | replay | latent-replay | lwf | ewc.")] = "replay",
    buffer: Annotated[int, typer.Option(min=1, help="Replay buffer size in samples.")] = 200,
    buffer_bytes: Annotated[
        str | None, typer.Option(help="Replay buffer budget instead of --buffer, e.g. 50KB.")
    ] = None,
    bits: Annotated[int | None, typer.Option(help="Buffer storage: 32 or 8 bits (latent replay: 8).")] = None,
    policy: Annotated[
        str, typer.Option(help="Buffer policy: class_balanced | reservoir.")
    ] = "class_balanced",
    optimizer: Annotated[str, typer.Option(help="sgd | adam.")] = "adam",
    lr: Annotated[float, typer.Option(min=0.0, help="Learning rate.")] = 0.01,
    replay_steps: Annotated[int, typer.Option(min=1, help="Replay mini-batches per observed batch.")] = 4,
    batch_size: Annotated[int, typer.Option(min=1, help="Stream samples per observe() call.")] = 10,
    drift: Annotated[
        str, typer.Option(help="Drift detector on the loss: none | page-hinkley | adwin.")
    ] = "none",
    pretrain_epochs: Annotated[
        int, typer.Option(min=1, help="Epochs of backbone pretraining (cached).")
    ] = 20,
    checkpoint: Annotated[
        str | None, typer.Option(help="Save the learner here (atomically) after each experience.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for splits, stream order and buffers.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
) -> None:
    configure_logging(verbose)
    if (scenario is None) == (data is None):
        fail("give exactly one of --scenario NAME and --data FILE")
        return
    try:
        payload = _run(
            scenario=scenario,
            data=data,
            model=model,
            scheme=scheme,
            strategy=strategy,
            buffer=buffer,
            buffer_bytes=buffer_bytes,
            bits=bits,
            policy=policy,
            optimizer=optimizer,
            lr=lr,
            replay_steps=replay_steps,
            batch_size=batch_size,
            drift=drift,
            pretrain_epochs=pretrain_epochs,
            checkpoint=checkpoint,
            seed=seed,
            progress=not json_output,
        )
    except OnDeviceError as exc:
        fail(exc)
        return
    if json_output:
        print_json(payload)
    else:
        _print_summary(payload)


def _detector(name: str) -> Any:
    from ondevice.continual import ADWIN, PageHinkley
    from ondevice.errors import UnknownNameError

    detectors = {"none": None, "page-hinkley": PageHinkley, "adwin": ADWIN}
    if name not in detectors:
        raise UnknownNameError("drift detector", name, detectors)
    factory = detectors[name]
    return factory() if factory is not None else None


def _run(**opts: Any) -> dict[str, Any]:
    import math

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    import ondevice
    from ondevice.continual import LearnerConfig, LogDrift, create_learner, load_scenario, run_scenario
    from ondevice.continual.scenarios import load_table
    from ondevice.data import Stream

    buffer_bytes = None
    if opts["buffer_bytes"] is not None:
        from memory import parse_bytes

        buffer_bytes = parse_bytes(opts["buffer_bytes"])
    if opts["bits"] not in (None, 8, 32):
        raise ondevice.ConfigError(f"--bits must be 8 or 32, got {opts['bits']}")
    if opts["scenario"] is not None:
        scenario = load_scenario(opts["scenario"], seed=opts["seed"])
        if opts["model"] is not None and opts["model"] != scenario.model:
            import dataclasses

            scenario = dataclasses.replace(scenario, model=opts["model"])
        backbone = scenario.backbone(epochs=opts["pretrain_epochs"], seed=opts["seed"])
        scheme = opts["scheme"] or "last_layer"
        total = sum(len(e.train) for e in scenario.experiences)
        title = f"{scenario.name}: {scenario.description}"
    else:
        table = load_table(opts["data"])
        features = table.x[0].numel()
        name = opts["model"] or "cnn1d"
        side = math.isqrt(features)
        if name == "cnn1d":
            backbone = ondevice.create_model("cnn1d", num_classes=2, length=features)
        elif side * side == features:
            backbone = ondevice.create_model(name, num_classes=2, resolution=side)
            table = type(table)(table.x.reshape(-1, 1, side, side), table.y)
        else:
            raise ondevice.ConfigError(
                f"model {name!r} needs square images but the file has {features} features; use --model cnn1d"
            )
        scheme = opts["scheme"] or "full"
        total = len(table)
        title = f"{opts['data']}: {len(table)} samples, {features} features, classes {list(table.classes)}"
    prepared = ondevice.prepare(backbone, scheme)
    learner = create_learner(
        prepared,
        opts["strategy"],
        buffer_size=opts["buffer"],
        buffer_bytes=buffer_bytes,
        bits=opts["bits"],
        policy=opts["policy"],
        optimizer=opts["optimizer"],
        lr=opts["lr"],
        drift=_detector(opts["drift"]),
        on_drift=(LogDrift(),),
        config=LearnerConfig(replay_steps=opts["replay_steps"], seed=opts["seed"]),
        seed=opts["seed"],
    )
    started = time.perf_counter()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not opts["progress"],
    )
    with progress:
        task = progress.add_task(f"{opts['strategy']}", total=total, loss="-")

        def advance(result: Any) -> None:
            loss = "-" if result.loss is None else f"{result.loss:.3f}"
            progress.update(task, advance=result.samples, loss=loss)

        def after_experience(index: int, row: list[float]) -> None:
            if opts["checkpoint"]:
                learner.save(opts["checkpoint"], extra={"experience": index})

        if opts["scenario"] is not None:
            result = run_scenario(
                learner,
                scenario,
                batch_size=opts["batch_size"],
                seed=opts["seed"],
                on_result=advance,
                on_experience=after_experience,
            )
            summary: dict[str, Any] = result.to_dict()
        else:
            stream = Stream(table, batch_size=opts["batch_size"])
            learner.learn(stream, on_result=advance, checkpoint=opts["checkpoint"])
            summary = {
                "samples": learner.state.trained_samples,
                "seconds": learner.state.train_seconds,
                "samples_per_second": learner.state.samples_per_second,
                "prequential_accuracy": learner.state.prequential_accuracy,
                "buffer_bytes": learner.buffer_bytes,
                "drifts": learner.state.drifts,
                "skipped_batches": learner.state.skipped_batches,
            }
    summary.update(
        {
            "title": title,
            "strategy": opts["strategy"],
            "scheme": prepared.scheme.to_dict(),
            "classes": learner.num_classes,
            "total_seconds": time.perf_counter() - started,
        }
    )
    return summary


def _print_summary(payload: dict[str, Any]) -> None:
    from rich.table import Table

    from memory import format_bytes

    console.print(f"[bold]ondevice train[/] {payload['title']}")
    matrix = payload.get("accuracy_matrix")
    if matrix:
        grid = Table(title="accuracy matrix R[i][j] (row: after experience i; column: test of experience j)")
        grid.add_column("after")
        for j in range(len(matrix)):
            grid.add_column(f"exp {j}", justify="right")
        for i, row in enumerate(matrix):
            grid.add_row(str(i), *(f"{v:.3f}" for v in row))
        console.print(grid)
    table = Table(title=f"summary ({payload['strategy']}, scheme {payload['scheme']['name']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("ACC", payload.get("acc")),
        ("BWT", payload.get("bwt")),
        ("FWT", payload.get("fwt")),
        ("average forgetting", payload.get("avg_forgetting")),
        ("prequential accuracy", payload.get("prequential_accuracy")),
    ]
    for label, value in rows:
        if value is not None:
            table.add_row(label, f"{value:.4f}")
    table.add_row("buffer", format_bytes(payload.get("buffer_bytes", 0)))
    table.add_row("samples/s", f"{payload.get('samples_per_second', 0.0):.1f}")
    table.add_row("classes (head rows)", str(payload["classes"]))
    table.add_row("drifts detected", str(payload.get("drifts", 0)))
    console.print(table)
