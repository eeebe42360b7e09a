"""``ondevice train``: continual learning on a digits scenario, a data file or a live serial sensor."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ondevice.cli._app import app, configure_logging, console, fail, print_json
from ondevice.errors import ConfigError, OnDeviceError

if TYPE_CHECKING:
    import torch

    from ondevice.continual import Learner

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
    common: dict[str, Any] = {
        "model": model,
        "scheme": scheme,
        "strategy": strategy,
        "buffer": buffer,
        "buffer_bytes": buffer_bytes,
        "bits": bits,
        "policy": policy,
        "optimizer": optimizer,
        "lr": lr,
        "replay_steps": replay_steps,
        "drift": drift,
        "checkpoint": checkpoint,
        "seed": seed,
        "progress": not json_output,
    }
    try:
        from ondevice.cli._resume import check_checkpoint

        common["resume"] = check_checkpoint(checkpoint, fresh=fresh)
        if serial is not None:
            source = _SerialSource(
                url=serial,
                window=32 if window is None else window,
                hop=hop,
                baudrate=115200 if baud is None else baud,
                label_column=-1 if label_column is None else label_column,
                labels=_split_labels(labels),
                max_samples=max_samples,
                duration_s=duration_s,
            )
            payload = _run_serial(
                source,
                batch_size=1 if batch_size is None else batch_size,
                checkpoint_every=100 if checkpoint_every is None else checkpoint_every,
                **common,
            )
        else:
            payload = _run(
                scenario=scenario,
                data=data,
                batch_size=10 if batch_size is None else batch_size,
                pretrain_epochs=pretrain_epochs,
                checkpoint_every=0 if checkpoint_every is None else checkpoint_every,
                **common,
            )
    except OnDeviceError as exc:
        fail(exc)
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


def _detector(name: str) -> Any:
    from ondevice.continual import ADWIN, PageHinkley
    from ondevice.errors import UnknownNameError

    detectors = {"none": None, "page-hinkley": PageHinkley, "adwin": ADWIN}
    if name not in detectors:
        raise UnknownNameError("drift detector", name, detectors)
    factory = detectors[name]
    return factory() if factory is not None else None


def _learner_options(opts: dict[str, Any]) -> dict[str, Any]:
    """``create_learner`` keyword arguments from the shared options, validated; a fresh drift detector."""
    from ondevice.continual import LearnerConfig, LogDrift

    buffer_bytes = None
    if opts["buffer_bytes"] is not None:
        from memory import parse_bytes

        buffer_bytes = parse_bytes(opts["buffer_bytes"])
    if opts["bits"] not in (None, 8, 32):
        raise ConfigError(f"--bits must be 8 or 32, got {opts['bits']}")
    return {
        "buffer_size": opts["buffer"],
        "buffer_bytes": buffer_bytes,
        "bits": opts["bits"],
        "policy": opts["policy"],
        "optimizer": opts["optimizer"],
        "lr": opts["lr"],
        "drift": _detector(opts["drift"]),
        "on_drift": (LogDrift(),),
        "config": LearnerConfig(replay_steps=opts["replay_steps"], seed=opts["seed"]),
        "seed": opts["seed"],
    }


def _run(**opts: Any) -> dict[str, Any]:
    import math

    import ondevice
    from ondevice.cli import _resume
    from ondevice.continual import create_learner, load_scenario

    learner_options = _learner_options(opts)
    path = opts["checkpoint"]
    scenario = table = None
    if opts["scenario"] is not None:
        scenario = load_scenario(opts["scenario"], seed=opts["seed"])
        model = opts["model"] or scenario.model
        scheme = opts["scheme"] or "last_layer"
        flags = _resume.learner_flags(
            opts,
            **{"--scenario": scenario.name, "--model": model, "--scheme": scheme},
            **{"--pretrain-epochs": opts["pretrain_epochs"]},
        )
        title = f"{scenario.name}: {scenario.description}"
    else:
        table = _resume.load_data(opts["data"])
        features = table.x[0].numel()
        model = opts["model"] or "cnn1d"
        scheme = opts["scheme"] or "full"
        flags = _resume.learner_flags(
            opts, **{"--model": model, "--scheme": scheme, "feature columns of --data": features}
        )
        title = f"{opts['data']}: {len(table)} samples, {features} features, classes {list(table.classes)}"
    record = _resume.read_record(path, flags) if opts["resume"] else None  # before any work
    _resume.seed_everything(opts["seed"])
    if scenario is not None:
        if model != scenario.model:
            import dataclasses

            scenario = dataclasses.replace(scenario, model=model)
        backbone = scenario.backbone(epochs=opts["pretrain_epochs"], seed=opts["seed"])
    else:
        assert table is not None
        side = math.isqrt(features)
        if model == "cnn1d":
            backbone = ondevice.create_model("cnn1d", num_classes=2, length=features)
        elif side * side == features:
            backbone = ondevice.create_model(model, num_classes=2, resolution=side)
            table = type(table)(table.x.reshape(-1, 1, side, side), table.y)
        else:
            raise ondevice.ConfigError(
                f"--model {model!r} needs square images but --data has {features} features; use --model cnn1d"
            )
    prepared = ondevice.prepare(backbone, scheme)
    learner = create_learner(prepared, opts["strategy"], **learner_options)
    resumed: dict[str, Any] | None = None
    if record is not None:
        _resume.load_checkpoint(learner, path)
        resumed = {"checkpoint": path, **_resume.restored_counters(learner)}
    started = time.perf_counter()
    with _resume.stop_on_interrupt(lambda: None) as interrupted:
        common = {"path": path, "flags": flags, "batch_size": opts["batch_size"], "stop": interrupted}
        common.update({"track": _tracker(opts["strategy"], enabled=opts["progress"]), "say": _say})
        if scenario is not None:
            summary = _resume.run_scenario_from(learner, scenario, record, seed=opts["seed"], **common)
        else:
            assert table is not None
            summary = _resume.run_rows_from(
                learner, table, record, name=opts["data"], save_every=opts["checkpoint_every"], **common
            )
    summary.update(
        {
            "title": title,
            "strategy": opts["strategy"],
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
    from rich.markup import escape
    from rich.table import Table

    from memory import format_bytes

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

_RECENT_WINDOWS = 50
"""Windows the running accuracy averages over."""

_MAX_DISCOVERED_LABELS = 100
"""More distinct labels than this, without --labels, means a sensor column is being read as the label."""

_RECONNECT_ATTEMPTS = 10
_SERIAL_QUEUE_READINGS = 8192

"""Reopening attempts after an unplug (about 10 s with the backoff below) before the run ends."""


@dataclass(frozen=True)
class _SerialSource:
    """Where ``ondevice train --serial`` reads, how it cuts readings into windows and when it stops."""

    url: str
    window: int = 32
    hop: int | None = None
    baudrate: int = 115200
    label_column: int = -1
    labels: tuple[str, ...] | None = None
    max_samples: int | None = None
    duration_s: float | None = None

    def __post_init__(self) -> None:
        if not self.url.strip():
            raise ConfigError("--serial needs a port or pyserial URL, e.g. /dev/ttyACM0, COM3 or loop://")
        if self.window < 1:
            raise ConfigError(
                f"--window must be at least 1 reading, got {self.window}; e.g. --window 32 (0.32 s at 100 Hz)"
            )
        if self.hop is not None and self.hop < 1:
            raise ConfigError(
                f"--hop must be at least 1 reading, got {self.hop}; --hop {self.window} (the window) makes "
                f"windows that do not overlap"
            )
        if self.baudrate < 1:
            raise ConfigError(
                f"--baud must be a positive line speed, got {self.baudrate}; e.g. --baud 115200"
            )
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"--max-samples must be at least 1, got {self.max_samples}; omit it to run on")
        if self.duration_s is not None and not 0 < self.duration_s < float("inf"):
            raise ConfigError(f"--duration must be a positive number of seconds, got {self.duration_s}")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"--labels names a class twice: {','.join(self.labels)}; list each class once")

    @property
    def step(self) -> int:
        """Readings between the starts of two windows."""
        return self.window if self.hop is None else self.hop


def _split_labels(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise ConfigError(f"--labels must be comma-separated class names such as idle,wave; got {text!r}")
    return names


def _open_hint(error: BaseException) -> str:
    import errno

    code = getattr(error, "errno", None)
    if isinstance(error, ValueError):
        return (
            "pyserial rejects it: give a device path such as /dev/ttyACM0 or COM3, or a URL such as loop:// "
            "or socket://HOST:PORT, and a standard --baud such as 115200"
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            "you may not open it: on Linux add yourself to the dialout group (sudo usermod -aG dialout "
            "$USER, then log in again)"
        )
    if code == errno.EBUSY:
        return "another program holds it: close serial monitors (Arduino IDE, screen, minicom) and retry"
    return (
        "check that the device is plugged in and the path is right (python -m serial.tools.list_ports lists "
        "the ports), or give a pyserial URL such as loop:// or socket://HOST:PORT"
    )


def _open_port(source: _SerialSource) -> tuple[Any, Callable[[], Any]]:
    """The port opened once (so a bad URL fails here, with the reason), and the opener for reconnecting."""
    from devices.ports import url_opener

    opener = url_opener(source.url, baudrate=source.baudrate)
    try:
        return opener(), opener
    except (OSError, ValueError) as error:  # serial.SerialException is an OSError
        raise ConfigError(
            f"cannot open the serial port {source.url!r}: {error}. Fix: {_open_hint(error)}"
        ) from None


class _WindowLearning:
    """One serial run's learning: builds the learner at the first labelled window, batches, checkpoints."""

    def __init__(
        self,
        build: Callable[[int], Learner],
        *,
        batch_size: int,
        checkpoint: str | None,
        checkpoint_every: int,
        extra: Callable[[], dict[str, Any]],
    ) -> None:
        self.build = build
        self.batch_size = batch_size
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self._extra = extra
        self.learner: Learner | None = None
        self.channels: int | None = None
        self.windows = 0
        self.skipped: dict[str, int] = {}
        self.recent: deque[float] = deque(maxlen=_RECENT_WINDOWS)
        self.saved_to: str | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._since_save = 0

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Take one ``(1, channels, window)`` window; learn once ``batch_size`` are pending."""
        self.windows += 1
        if int(y) < 0:  # no label, or one that --labels does not list
            self._skip("unlabelled")
            return
        channels = int(x.shape[1])
        if self.learner is None:
            self.learner = self.build(channels)
            self.channels = channels
        elif channels != self.channels:
            if "channels" not in self.skipped:
                logger.warning(
                    "the sensor now sends %d values per reading, the model takes %d; skipping such windows",
                    channels,
                    self.channels,
                )
            self._skip("channels")
            return
        self._pending.append((x, y))
        if len(self._pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Learn the pending windows (predicting each first: the prequential accuracy)."""
        import torch

        if not self._pending or self.learner is None:
            return
        x = torch.cat([pair[0] for pair in self._pending])
        y = torch.cat([pair[1] for pair in self._pending])
        self._pending.clear()
        result = self.learner.observe(x, y)
        if result.accuracy is not None:
            self.recent.extend([result.accuracy] * result.samples)
            self._since_save += result.samples
        if self.checkpoint_every and self._since_save >= self.checkpoint_every:
            self.save()

    def save(self) -> None:
        """Save the learner to the checkpoint atomically (nothing to save before the first window)."""
        if self.checkpoint is None or self.learner is None:
            return
        try:
            self.learner.save(self.checkpoint, extra=self._extra())
        except OSError as error:
            raise ConfigError(
                f"cannot write the checkpoint {self.checkpoint!r}: {error}; pass a --checkpoint path in a "
                f"writable directory"
            ) from None
        self._since_save = 0
        self.saved_to = self.checkpoint

    @property
    def recent_accuracy(self) -> float | None:
        """Prequential accuracy over the last ``_RECENT_WINDOWS`` windows learned."""
        return sum(self.recent) / len(self.recent) if self.recent else None


def _check_window_fits(learner: Learner, window: int) -> None:
    """Fail now, not at the first window, if one window is too short to train on (batch norm needs more
    than one value per channel; the first window, and a last partial batch, may come alone)."""
    import torch

    net = learner.model.model
    net.train()
    try:
        with torch.no_grad():
            net(torch.zeros(1, 1, window))
    except ValueError as error:
        raise ConfigError(
            f"--window {window} is too short to train the cnn1d on one window ({error}); use a longer "
            f"--window, e.g. 16"
        ) from None


def _check_label_count(source: _SerialSource, label_index: dict[str, int]) -> None:
    if source.labels is not None or len(label_index) <= _MAX_DISCOVERED_LABELS:
        return
    names = sorted(label_index, key=label_index.__getitem__)
    examples = ", ".join(repr(name) for name in names[-3:])
    raise ConfigError(
        f"label column {source.label_column} of {source.url!r} gave {len(names)} different labels (e.g. "
        f"{examples}): it looks like a sensor value, not a class name. Pass --label-column INDEX of the "
        f"column with the class name, or --labels a,b,... to learn only those classes"
    )


def _run_serial(
    source: _SerialSource, *, batch_size: int, checkpoint_every: int, **opts: Any
) -> dict[str, Any]:
    import torch
    from rich.progress import MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    import ondevice
    from devices.lines import SampleStream, Windower
    from devices.ports import Backoff, ReconnectingPort
    from ondevice.cli import _resume
    from ondevice.continual import create_learner

    if checkpoint_every < 0:
        raise ConfigError(
            f"--checkpoint-every must be >= 0 windows (0: only at the end), got {checkpoint_every}"
        )
    if (opts["model"] or "cnn1d") != "cnn1d":
        raise ConfigError(
            f"--serial trains a cnn1d over (channels, window) built from scratch; --model {opts['model']!r} "
            f"is not supported with it: drop --model"
        )
    scheme = opts["scheme"] or "full"
    num_classes = len(source.labels) if source.labels else 2  # the head grows with new labels

    def model_kwargs(channels: int) -> dict[str, Any]:
        return {"in_channels": channels, "length": source.window, "num_classes": num_classes}

    def build(channels: int) -> Learner:
        torch.manual_seed(opts["seed"])
        net = ondevice.create_model("cnn1d", **model_kwargs(channels))
        return create_learner(ondevice.prepare(net, scheme), opts["strategy"], **_learner_options(opts))

    probe = build(1)  # every learner option is checked before the port opens
    _check_window_fits(probe, source.window)
    scheme_dict = probe.model.scheme.to_dict()
    flags = _resume.learner_flags(
        opts,
        **{"--model": "cnn1d", "--scheme": scheme, "--window": source.window, "--hop": source.step},
        **{"--label-column": source.label_column, "--labels": list(source.labels) if source.labels else None},
    )
    record = _resume.read_record(opts["checkpoint"], flags) if opts["resume"] else None
    windower = Windower(source.window, source.hop, labels=source.labels)
    port, opener = _open_port(source)
    handed = [port]

    def reopen() -> Any:
        return handed.pop() if handed else opener()

    stream = SampleStream(
        ReconnectingPort(reopen, backoff=Backoff(max_s=2.0, max_attempts=_RECONNECT_ATTEMPTS)),
        label_column=source.label_column,
        # Read in a thread of its own, so a sensor faster than learning never fills the OS buffer; when
        # learning falls this far behind, the oldest readings go and the summary counts them (overflow).
        queue_size=_SERIAL_QUEUE_READINGS,
    )

    def label_names() -> list[str]:
        return sorted(windower.label_index, key=windower.label_index.__getitem__)

    def setting() -> dict[str, Any]:
        """Where the windows came from: in the checkpoint's metadata and in the summary."""
        return {
            "source": "serial",
            "url": source.url,
            "window": source.window,
            "hop": source.step,
            "label_column": source.label_column,
            "labels": label_names(),
        }

    def extra() -> dict[str, Any]:
        return {
            **setting(),
            "model": "cnn1d",
            "model_kwargs": model_kwargs(learning.channels or 0),
            "windows": learning.windows,
            _resume.RECORD_KEY: {"flags": flags, "windows": learning.windows},
        }

    learning = _WindowLearning(
        build,
        batch_size=batch_size,
        checkpoint=opts["checkpoint"],
        checkpoint_every=checkpoint_every,
        extra=extra,
    )
    resumed = None
    if record is not None:
        resumed = _resume.resume_serial(
            learning, windower, record, opts["checkpoint"], fixed=bool(source.labels)
        )
        resumed["checkpoint"] = learning.saved_to = opts["checkpoint"]
    samples = 0
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        MofNCompleteColumn(),
        TextColumn(
            "readings, {task.fields[windows]} windows, accuracy {task.fields[accuracy]}, {task.fields[rate]}"
        ),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not opts["progress"],
    )
    started = time.perf_counter()
    with stream, progress, _resume.stop_on_interrupt(stream.close) as interrupted:
        task = progress.add_task(
            f"{opts['strategy']} on {source.url}", total=source.max_samples, windows=0, accuracy="-", rate="-"
        )
        for sample in stream.samples(max_samples=source.max_samples, duration_s=source.duration_s):
            samples += 1
            for x, y in windower.push(sample):
                _check_label_count(source, windower.label_index)
                learning.add(x, y)
            accuracy = learning.recent_accuracy
            rate = stream.stats.sampling_rate_hz
            progress.update(
                task,
                completed=samples,
                windows=learning.windows,
                accuracy="-" if accuracy is None else f"{accuracy:.2f}",
                rate="-" if rate is None else f"{rate:.0f} Hz",
            )
        learning.flush()
        learning.save()
    seconds = time.perf_counter() - started

    if interrupted.is_set():
        stopped_by = "interrupted"
    elif source.max_samples is not None and samples >= source.max_samples:
        stopped_by = "max_samples"
    elif stream.port.gave_up or source.duration_s is None:
        stopped_by = "stream_ended"
    else:
        stopped_by = "duration"
    learner = learning.learner
    state = learner.state if learner is not None else None
    stats = stream.stats.to_dict()
    stats.pop("samples")  # what the reader parsed, possibly past the stop; "samples" below were windowed
    channels = stats["channels"]
    return {
        "title": f"{source.url}: {channels or '?'} channel(s), window {source.window}, hop {source.step}",
        **setting(),
        "samples": samples,
        "windows": learning.windows,
        "windows_learned": state.trained_samples if state else 0,
        "windows_skipped": dict(learning.skipped),
        **stats,
        "prequential_accuracy": state.prequential_accuracy if state and state.trained_samples else None,
        "recent_accuracy": learning.recent_accuracy,
        "buffer_bytes": learner.buffer_bytes if learner is not None else 0,
        "samples_per_second": samples / seconds if seconds > 0 else 0.0,
        "learn_seconds": state.train_seconds if state else 0.0,
        "seconds": seconds,
        "drifts": state.drifts if state else 0,
        "skipped_batches": state.skipped_batches if state else 0,
        "stopped_by": stopped_by,
        "resumed": resumed,
        "checkpoint": learning.saved_to,
        "strategy": opts["strategy"],
        "scheme": scheme_dict,
        "classes": learner.num_classes if learner is not None else 0,
    }


def _print_serial_summary(payload: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from memory import format_bytes

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
        (f"running accuracy (last {_RECENT_WINDOWS} windows)", "recent_accuracy"),
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
