"""``ondevice train``: continual learning on a digits scenario, a data file or a live serial sensor."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

import ondevice
from devices.models import WindowModel, feature_model
from devices.session import RECENT_WINDOWS, SerialSession, SessionConfig
from memory import format_bytes
from ondevice.cli import _resume
from ondevice.cli._app import app, configure_logging, console, fail, print_json
from ondevice.continual import Learner, create_learner, load_scenario
from ondevice.errors import ConfigError, OnDeviceError

logger = logging.getLogger(__name__)

_HELP = """Learn continually from a stream, seeing each sample once, and report what was kept.

Either a built-in scenario on the shipped digits (--scenario; the backbone is pretrained on held-out
samples that are never part of the stream) or your own data (--data). A data file is a .csv
(comma-separated, an optional header line) or a .npy 2-D array with one sample per row: the LAST column
is the integer label, every other column is a feature. It is streamed in file order; a model is built
for it from scratch (cnn1d over the features as a series, or cnn when their count is a square) and
trained under --scheme (default full).

Or a live sensor: --serial reads a port such as /dev/ttyACM0 (or a pyserial URL such as loop://) in the
Edge Impulse data forwarder format, one reading per line ("0.12,-9.81,0.40,wave"), with the class name
in --label-column (default the last). Lines it cannot use are dropped and counted by reason. Readings
are cut into windows of --window samples (a new one every --hop) and each window is learned as it
arrives by a cnn1d over (channels, window), built from scratch for the channel count of the first
reading, under --scheme (default full). The run ends at --max-samples, after --duration seconds, when
the device stays unplugged for about 10 s, or on Ctrl-C; each way the learner is saved to --checkpoint
(also every --checkpoint-every windows) and the summary is printed.

With --checkpoint, rerunning the same command resumes from it (and says what it restored): a scenario
continues after the last completed experience, a data file after the rows already learned (a new file
is learned from its first row), a sensor keeps its classes and counters. A checkpoint saved with other
options is refused; --fresh starts over and replaces it. Ctrl-C stops between batches, saves the
learner (a scenario keeps its last completed experience), prints the summary so far and exits 130.
"""


@app.command("train", help=_HELP)
def train(
    scenario: Annotated[
        str | None,
        typer.Option(help="class-incremental | domain-incremental | sensor (or give --data or --serial)."),
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="A .csv or .npy file: last column the label, the rest the features.")
    ] = None,
    serial: Annotated[
        str | None,
        typer.Option(
            "--serial",
            help="Learn live from a serial port or pyserial URL: /dev/ttyACM0, COM3, loop://, socket://HOST:PORT.",
        ),
    ] = None,
    window: Annotated[
        int | None, typer.Option(help="--serial: readings per model input window (default 32).")
    ] = None,
    hop: Annotated[
        int | None,
        typer.Option(help="--serial: readings between the starts of two windows (default: --window)."),
    ] = None,
    baud: Annotated[
        int | None, typer.Option(help="--serial: line speed in baud (default 115200, the forwarder's).")
    ] = None,
    label_column: Annotated[
        int | None,
        typer.Option(
            help="--serial: column of the class name, negative from the end (default -1: the last)."
        ),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            help="--serial: class names in head order, e.g. idle,wave; windows of other labels are skipped "
            "(default: numbered as they appear)."
        ),
    ] = None,
    max_samples: Annotated[int | None, typer.Option(help="--serial: stop after this many readings.")] = None,
    duration_s: Annotated[
        float | None, typer.Option("--duration", help="--serial: stop after this many seconds.")
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option(
            help="Also save --checkpoint every N samples learned (--serial: windows, default 100; --data: "
            "default 0, only at the end)."
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Zoo model (default: the scenario's, cnn1d for --data and --serial).")
    ] = None,
    scheme: Annotated[
        str | None,
        typer.Option(help="Update scheme (default: last_layer for scenarios, full for --data and --serial)."),
    ] = None,
    strategy: Annotated[
        str, typer.Option(help="naive | replay | der | latent-replay | latent-der | lwf | ewc.")
    ] = "replay",
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
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1, help="Stream samples per observe() call (default 10; --serial: windows, default 1)."
        ),
    ] = None,
    drift: Annotated[
        str, typer.Option(help="Drift detector on the loss: none | page-hinkley | adwin.")
    ] = "none",
    pretrain_epochs: Annotated[
        int, typer.Option(min=1, help="Epochs of backbone pretraining (cached).")
    ] = 20,
    checkpoint: Annotated[
        str | None,
        typer.Option(
            help="Save the learner here (atomically) after each experience, or at the end (see "
            "--checkpoint-every); an existing one is resumed."
        ),
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Start over instead of resuming --checkpoint (replaces it).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for splits, stream order and buffers.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
) -> None:
    configure_logging(verbose)
    sources = [
        flag
        for flag, value in (("--scenario", scenario), ("--data", data), ("--serial", serial))
        if value is not None
    ]
    if len(sources) != 1:
        given = f" (got {' and '.join(sources)})" if sources else ""
        fail(f"give exactly one of --scenario NAME, --data FILE and --serial URL{given}")
        return
    serial_only = {
        "--window": window,
        "--hop": hop,
        "--baud": baud,
        "--label-column": label_column,
        "--labels": labels,
        "--max-samples": max_samples,
        "--duration": duration_s,
    }
    stray = [flag for flag, value in serial_only.items() if value is not None]
    if serial is None and stray:
        verb = "applies" if len(stray) == 1 else "apply"
        fail(f"{', '.join(stray)} {verb} only to --serial URL; remove them, or read a sensor with --serial")
        return
    if scenario is not None and checkpoint_every is not None:
        fail(
            "--checkpoint-every applies only to --data and --serial (a scenario saves --checkpoint after "
            "each experience); remove it"
        )
        return
    if checkpoint_every is not None and checkpoint_every < 0:
        fail(f"--checkpoint-every must be >= 0 samples (0: only at the end), got {checkpoint_every}")
        return
    options = _resume.LearnerOptions(
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
        drift=drift,
        seed=seed,
    )
    progress = not json_output
    try:
        resume = _resume.check_checkpoint(checkpoint, fresh=fresh)
        if serial is not None:
            names = _split_labels(labels)
            config = SessionConfig(
                url=serial,
                window=32 if window is None else window,
                hop=hop,
                baudrate=115200 if baud is None else baud,
                label_column=-1 if label_column is None else label_column,
                labels=names,
                max_samples=max_samples,
                duration_s=duration_s,
                batch_size=1 if batch_size is None else batch_size,
                checkpoint=checkpoint,
                checkpoint_every=100 if checkpoint_every is None else checkpoint_every,
                seed=seed,
                model=WindowModel(num_classes=len(names) if names else 2),  # the head grows with new labels
            )
            payload = _run_serial(config, options, resume=resume, progress=progress)
        else:
            payload = _run(
                options,
                scenario_name=scenario,
                data=data,
                checkpoint=checkpoint,
                resume=resume,
                batch_size=10 if batch_size is None else batch_size,
                pretrain_epochs=pretrain_epochs,
                checkpoint_every=0 if checkpoint_every is None else checkpoint_every,
                progress=progress,
            )
    except OnDeviceError as exc:
        fail(_as_flags(str(exc)))
        return
    except KeyboardInterrupt:  # before the learning loop (loading, pretraining) or a second Ctrl-C
        console.print("interrupted; --checkpoint keeps what was last saved", markup=False, highlight=False)
        raise typer.Exit(_INTERRUPTED) from None
    if json_output:
        print_json(payload)
    elif serial is not None:
        _print_serial_summary(payload)
    else:
        _print_summary(payload)
    if payload.get("stopped_by") == "interrupted":
        raise typer.Exit(_INTERRUPTED)


_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


def _say(text: str) -> None:
    """A line for people on stderr; user-supplied text in it is never read as markup."""
    console.print(text, markup=False, highlight=False)


def _run(
    options: _resume.LearnerOptions,
    *,
    scenario_name: str | None,
    data: str | None,
    checkpoint: str | None,
    resume: bool,
    batch_size: int,
    pretrain_epochs: int,
    checkpoint_every: int,
    progress: bool,
) -> dict[str, Any]:
    """A built-in scenario (``scenario_name``) or a data file (``data``): the summary."""
    learner_kwargs = options.learner_kwargs()
    path = checkpoint
    scenario = table = None
    if scenario_name is not None:
        scenario = load_scenario(scenario_name, seed=options.seed)
        model = options.model or scenario.model
        scheme = options.scheme or "last_layer"
        flags = options.flags(
            **{"--scenario": scenario.name, "--model": model, "--scheme": scheme},
            **{"--pretrain-epochs": pretrain_epochs},
        )
        title = f"{scenario.name}: {scenario.description}"
    else:
        assert data is not None
        table = _resume.load_data(data)
        features = table.x[0].numel()
        model = options.model or "cnn1d"
        scheme = options.scheme or "full"
        flags = options.flags(**{"--model": model, "--scheme": scheme, "feature columns of --data": features})
        title = f"{data}: {len(table)} samples, {features} features, classes {list(table.classes)}"
    record = _resume.read_record(path, flags) if resume and path is not None else None  # before any work
    _resume.seed_everything(options.seed)
    if scenario is not None:
        if model != scenario.model:
            scenario = dataclasses.replace(scenario, model=model)
        backbone = scenario.backbone(epochs=pretrain_epochs, seed=options.seed)
    else:
        assert table is not None
        built = feature_model(model, features)
        backbone = built.model
        if built.input_shape is not None:
            table = type(table)(table.x.reshape(-1, *built.input_shape), table.y)
    prepared = ondevice.prepare(backbone, scheme)
    learner = create_learner(prepared, options.strategy, **learner_kwargs)
    resumed: dict[str, Any] | None = None
    if record is not None and path is not None:
        _resume.load_checkpoint(learner, path)
        resumed = {"checkpoint": path, **_resume.restored_counters(learner)}
    started = time.perf_counter()
    track = _tracker(options.strategy, enabled=progress)
    with _resume.stop_on_interrupt(lambda: None) as interrupted:
        if scenario is not None:
            summary = _resume.run_scenario_from(
                learner,
                scenario,
                record,
                seed=options.seed,
                path=path,
                flags=flags,
                batch_size=batch_size,
                stop=interrupted,
                track=track,
                say=_say,
            )
        else:
            assert table is not None and data is not None
            summary = _resume.run_rows_from(
                learner,
                table,
                record,
                name=data,
                save_every=checkpoint_every,
                path=path,
                flags=flags,
                batch_size=batch_size,
                stop=interrupted,
                track=track,
                say=_say,
            )
    summary.update(
        {
            "title": title,
            "strategy": options.strategy,
            "scheme": prepared.scheme.to_dict(),
            "classes": learner.num_classes,
            "skipped_batches": learner.state.skipped_batches,
            "resumed": resumed,
            "stopped_by": "interrupted" if interrupted.is_set() else "finished",
            "total_seconds": time.perf_counter() - started,
        }
    )
    return summary


def _tracker(description: str, *, enabled: bool) -> Callable[[int], contextlib.AbstractContextManager[Any]]:
    """``track(total)``: a context yielding an ``on_result`` callback that moves a progress bar on stderr."""

    @contextlib.contextmanager
    def track(total: int) -> Iterator[Callable[[Any], None]]:
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not enabled,
        )
        with progress:
            task = progress.add_task(description, total=total, loss="-")

            def advance(result: Any) -> None:
                loss = "-" if result.loss is None else f"{result.loss:.3f}"
                progress.update(task, advance=result.samples, loss=loss)

            yield advance

    return track


def _print_summary(payload: dict[str, Any]) -> None:

    console.print(f"[bold]ondevice train[/] {escape(payload['title'])}")
    matrix = payload.get("accuracy_matrix")
    if matrix:
        grid = Table(title="accuracy matrix R[i][j] (row: after experience i; column: test of experience j)")
        grid.add_column("after")
        for j in range(len(matrix[0])):
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
    table.add_row("samples learned", f"{payload.get('samples', 0):,}")
    if "experiences_completed" in payload:
        done, total = payload["experiences_completed"], payload["experiences_total"]
        table.add_row("experiences completed", f"{done} of {total}")
    table.add_row("batches skipped (NaN/Inf)", f"{payload.get('skipped_batches', 0):,}")
    table.add_row("buffer", format_bytes(payload.get("buffer_bytes", 0)))
    table.add_row("samples/s", f"{payload.get('samples_per_second', 0.0):.1f}")
    table.add_row("classes (head rows)", str(payload["classes"]))
    table.add_row("drifts detected", str(payload.get("drifts", 0)))
    table.add_row("stopped by", payload.get("stopped_by", "finished"))
    table.add_row("checkpoint", escape(payload.get("checkpoint") or "-"))
    console.print(table)


# -- --serial: a live sensor ----------------------------------------------------------------------------


def _split_labels(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise ConfigError(f"--labels must be comma-separated class names such as idle,wave; got {text!r}")
    return names


#: The flag of each SessionConfig field: the library names fields, the CLI's user typed flags.
_SESSION_FLAGS = {
    "url": "--serial",
    "window": "--window",
    "hop": "--hop",
    "baudrate": "--baud",
    "label_column": "--label-column",
    "labels": "--labels",
    "max_samples": "--max-samples",
    "duration_s": "--duration",
    "batch_size": "--batch-size",
    "checkpoint": "--checkpoint",
    "checkpoint_every": "--checkpoint-every",
    "seed": "--seed",
}


def _as_flags(message: str) -> str:
    """``message`` with every ``SessionConfig.<field>`` it names replaced by that field's flag."""
    return re.sub(r"SessionConfig\.(\w+)", lambda m: _SESSION_FLAGS.get(m.group(1), m.group(0)), message)


def _run_serial(
    config: SessionConfig, options: _resume.LearnerOptions, *, resume: bool, progress: bool
) -> dict[str, Any]:
    """Learn from the sensor at ``config.url`` with a :class:`~devices.session.SerialSession`: the summary."""
    if (options.model or "cnn1d") != "cnn1d":
        raise ConfigError(
            f"--serial trains a cnn1d over (channels, window) built from scratch; --model {options.model!r} "
            f"is not supported with it: drop --model"
        )
    scheme = options.scheme or "full"

    def make_learner(net: ondevice.ClassifierModel) -> Learner:
        return create_learner(ondevice.prepare(net, scheme), options.strategy, **options.learner_kwargs())

    flags = options.flags(
        **{"--model": "cnn1d", "--scheme": scheme, "--window": config.window, "--hop": config.step},
        **{"--label-column": config.label_column, "--labels": list(config.labels) if config.labels else None},
    )
    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        MofNCompleteColumn(),
        TextColumn(
            "readings, {task.fields[windows]} windows, accuracy {task.fields[accuracy]}, {task.fields[rate]}"
        ),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not progress,
    )
    task = bar.add_task(
        f"{options.strategy} on {config.url}", total=config.max_samples, windows=0, accuracy="-", rate="-"
    )

    def show(session: SerialSession) -> None:
        accuracy = session.recent_accuracy
        rate = session.stream.stats.sampling_rate_hz if session.stream is not None else None
        bar.update(
            task,
            completed=session.samples,
            windows=session.windows,
            accuracy="-" if accuracy is None else f"{accuracy:.2f}",
            rate="-" if rate is None else f"{rate:.0f} Hz",
        )

    session = SerialSession(
        config,
        make_learner,
        extra=lambda s: {_resume.RECORD_KEY: {"flags": flags, "windows": s.windows}},
        on_reading=show,
    )
    path = config.checkpoint
    record = _resume.read_record(path, flags) if resume and path is not None else None
    session.open()
    resumed = None
    if record is not None and path is not None:
        resumed = _resume.resume_serial(session, record, path, fixed=bool(config.labels))
        resumed["checkpoint"] = path
    with bar:
        summary = session.run()
    return dataclasses.replace(summary, strategy=options.strategy, resumed=resumed).to_dict()


def _print_serial_summary(payload: dict[str, Any]) -> None:

    console.print(f"[bold]ondevice train[/] {escape(payload['title'])}")
    table = Table(title=f"summary ({payload['strategy']}, scheme {payload['scheme']['name']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    skipped = payload["windows_skipped"]
    rate = payload["sampling_rate_hz"]
    rows = [
        ("readings (samples) read", f"{payload['samples']:,}"),
        ("windows learned", f"{payload['windows_learned']:,} of {payload['windows']:,}"),
        *((f"  windows skipped: {reason}", f"{count:,}") for reason, count in sorted(skipped.items())),
        ("lines dropped", f"{payload['dropped_total']:,} of {payload['lines']:,} read"),
        *((f"  dropped: {reason}", f"{count:,}") for reason, count in sorted(payload["dropped"].items())),
        ("sampling rate", "-" if rate is None else f"{rate:.1f} Hz"),
        ("channels", str(payload["channels"] or "-")),
        ("reconnects", str(payload["reconnects"])),
    ]
    for label, key in (
        ("prequential accuracy", "prequential_accuracy"),
        (f"running accuracy (last {RECENT_WINDOWS} windows)", "recent_accuracy"),
    ):
        rows.append((label, "-" if payload[key] is None else f"{payload[key]:.4f}"))
    rows += [
        ("buffer", format_bytes(payload["buffer_bytes"])),
        ("samples/s", f"{payload['samples_per_second']:.1f}"),
        ("classes", ", ".join(payload["labels"]) or "-"),
        ("batches skipped (NaN/Inf)", f"{payload['skipped_batches']:,}"),
        ("drifts detected", str(payload["drifts"])),
        ("stopped by", payload["stopped_by"].replace("_", " ")),
        ("checkpoint", payload["checkpoint"] or "-"),
    ]
    for label, value in rows:
        table.add_row(escape(label), escape(value))
    console.print(table)
