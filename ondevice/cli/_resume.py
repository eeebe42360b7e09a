"""``ondevice train --checkpoint``: validate the path first, resume from a compatible learner, stop on Ctrl-C.

A checkpoint written by ``ondevice train`` is a learner checkpoint (:data:`ondevice.checkpoint.KIND_LEARNER`)
whose ``extra`` metadata holds a ``"train"`` record: the source (``scenario``, ``data`` or ``serial``), the
options that shape the learner (by flag name, so a mismatch is reported in the user's terms) and where the
run got to (the last completed experience, the rows of the data file learned). Rerunning the command with
the same ``--checkpoint`` continues from there; ``--fresh`` starts over and replaces it.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from devices.session import SerialSession, stop_on_interrupt
from memory import parse_bytes
from ondevice.checkpoint import KIND_LEARNER, check_target
from ondevice.cli._app import console
from ondevice.continual import (
    ADWIN,
    ContinualMetrics,
    ContinualResult,
    DriftDetector,
    Learner,
    LearnerConfig,
    LogDrift,
    ObserveResult,
    PageHinkley,
    Scenario,
)
from ondevice.continual.state import read_learner_state
from ondevice.data import Stream, TensorData, load_table
from ondevice.errors import CheckpointError, ConfigError, UnknownNameError

__all__ = [
    "RECORD_KEY",
    "LearnerOptions",
    "RowCursor",
    "ScenarioProgress",
    "check_checkpoint",
    "describe_state",
    "learn_rows",
    "learn_scenario",
    "load_checkpoint",
    "load_data",
    "read_record",
    "restored_counters",
    "resume_serial",
    "run_rows_from",
    "run_scenario_from",
    "scenario_summary",
    "seed_everything",
    "stop_on_interrupt",
    "until",
]

RECORD_KEY = "train"
"""Key of the ``ondevice train`` record in a learner checkpoint's ``extra`` metadata."""

_DETECTORS: dict[str, Callable[[], DriftDetector] | None] = {
    "none": None,
    "page-hinkley": PageHinkley,
    "adwin": ADWIN,
}


_START_OVER = "pass --fresh to start over (the checkpoint is replaced), or another --checkpoint path"


# -- setting a run up ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LearnerOptions:
    """The options of ``ondevice train`` that shape the learner, as given (None: the source's default)."""

    model: str | None = None
    scheme: str | None = None
    strategy: str = "replay"
    buffer: int = 200
    buffer_bytes: str | None = None
    bits: int | None = None
    policy: str = "class_balanced"
    optimizer: str = "adam"
    lr: float = 0.01
    replay_steps: int = 4
    drift: str = "none"
    seed: int = 0

    def flags(self, **resolved: Any) -> dict[str, Any]:
        """These options by flag, and ``resolved`` ones: a checkpoint saved with other values is not
        resumed."""
        return {
            "--strategy": self.strategy,
            "--buffer": self.buffer,
            "--buffer-bytes": self.buffer_bytes,
            "--bits": self.bits,
            "--policy": self.policy,
            "--optimizer": self.optimizer,
            "--lr": self.lr,
            "--replay-steps": self.replay_steps,
            "--drift": self.drift,
            "--seed": self.seed,
            **resolved,
        }

    def learner_kwargs(self) -> dict[str, Any]:
        """``create_learner`` keyword arguments, validated; a fresh drift detector each call."""
        if self.bits not in (None, 8, 32):
            raise ConfigError(f"--bits must be 8 or 32, got {self.bits}")
        if self.drift not in _DETECTORS:
            raise UnknownNameError("drift detector", self.drift, _DETECTORS)
        detector = _DETECTORS[self.drift]
        return {
            "buffer_size": self.buffer,
            "buffer_bytes": parse_bytes(self.buffer_bytes) if self.buffer_bytes is not None else None,
            "bits": self.bits,
            "policy": self.policy,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "drift": detector() if detector is not None else None,
            "on_drift": (LogDrift(),),
            "config": LearnerConfig(replay_steps=self.replay_steps, seed=self.seed),
            "seed": self.seed,
        }


def load_data(path: str) -> TensorData:
    """The --data table, every way it can fail turned into an error that names --data."""
    if Path(path).is_dir():
        raise ConfigError(f"--data cannot read {path!r}: it is a directory; pass a .csv or .npy file")
    try:
        table = load_table(path)
    except ConfigError as error:  # it names the file and what is wrong (no permission, a truncated .npy)
        raise ConfigError(f"--data: {error}") from None
    if int(table.y.max()) >= _MAX_DATA_CLASSES:
        raise ConfigError(
            f"--data: the last column of {path!r} holds label {int(table.y.max())}; labels must be class "
            f"indices 0..{_MAX_DATA_CLASSES - 1}. Check that the label is the LAST column"
        )
    return table


_MAX_DATA_CLASSES = 1000
"""Most classes a --data file may have (the learner's head never grows past this)."""


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from that is not seeded where it is used: model and head
    initialisation (torch's global generator), and Python's and NumPy's for any library that uses them."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_checkpoint(path: str | None, *, fresh: bool) -> bool:
    """Validate ``--checkpoint`` before any work starts; True when it holds a learner to resume from.

    Raises:
        ConfigError: ``--fresh`` without ``--checkpoint``, or the path is a directory, a file that is not
            an ondevice checkpoint, a checkpoint of another kind, a damaged one, or not writable.
    """
    if path is None:
        if fresh:
            raise ConfigError(
                "--fresh starts over from an existing --checkpoint; pass --checkpoint PATH or drop --fresh"
            )
        return False
    if not path.strip():
        raise ConfigError("--checkpoint needs a file path, got ''; e.g. --checkpoint learner.safetensors")
    try:
        exists = check_target(path, kind=KIND_LEARNER)
    except CheckpointError as error:
        raise ConfigError(f"--checkpoint {path!r} cannot be used: {error}") from None
    return exists and not fresh


def read_record(path: str, flags: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``extra`` metadata, after checking that it was saved by a run like this one.

    ``flags`` maps each option that shapes the learner (``"--strategy"``, ``"--seed"``, ...) to this run's
    value; every one that differs from the saved run's is named in the error.

    Raises:
        ConfigError: the checkpoint cannot be read, was not written by ``ondevice train``, or differs.
    """
    try:
        _, metadata = read_learner_state(path)
    except CheckpointError as error:
        raise ConfigError(f"--checkpoint {path!r} cannot be resumed: {error}; {_START_OVER}") from None
    extra = dict(metadata.get("extra") or {})
    record = extra.get(RECORD_KEY)
    if not isinstance(record, dict) or not isinstance(record.get("flags"), dict):
        raise ConfigError(
            f"--checkpoint {path!r} holds a learner that was not saved by `ondevice train` (it records no "
            f"options to check against), so it cannot be resumed; {_START_OVER}"
        )
    saved: dict[str, Any] = record["flags"]
    differences = [
        f"{flag} {_show(saved.get(flag))} there, {_show(flags.get(flag))} here"
        for flag in sorted(set(saved) | set(flags))
        if saved.get(flag) != flags.get(flag)
    ]
    if differences:
        raise ConfigError(
            f"--checkpoint {path!r} was saved by a different run ({'; '.join(differences)}); rerun with the "
            f"same options to resume it, or {_START_OVER}"
        )
    return extra


def _show(value: Any) -> str:
    if value is None:
        return "not given"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "none"
    return repr(value) if isinstance(value, str) else str(value)


def load_checkpoint(learner: Learner, path: str) -> None:
    """Load ``path`` into ``learner`` (already checked with :func:`read_record`)."""
    try:
        learner.load(path)
    except CheckpointError as error:
        raise ConfigError(f"--checkpoint {path!r} does not fit this run: {error}; {_START_OVER}") from None


def describe_state(learner: Learner) -> str:
    """What a restored learner brings along, for the line that says a run resumes."""
    state = learner.state
    text = (
        f"{state.trained_samples:,} samples learned ({state.samples_seen:,} seen), "
        f"{learner.num_classes} classes"
    )
    if state.trained_samples:
        text += f", prequential accuracy {state.prequential_accuracy:.4f}"
    if state.skipped_batches:
        text += f", {state.skipped_batches:,} batches skipped for NaN/Inf"
    return text


def resume_serial(
    session: SerialSession, extra: Mapping[str, Any], path: str, *, fixed: bool
) -> dict[str, Any]:
    """Put a ``--serial`` checkpoint's learner (built for its channel count), window count and class names
    (unless ``--labels`` fixed them) into ``session``; say so; what was restored."""
    channels = int((extra.get("model_kwargs") or {}).get("in_channels") or 0)
    if channels < 1:
        raise ConfigError(
            f"--checkpoint {path!r} records no channel count for its model, so it cannot be resumed; "
            f"{_START_OVER}"
        )
    learner = session.build_learner(channels)
    load_checkpoint(learner, path)
    windows = int(extra.get("windows") or 0)
    labels = [str(name) for name in extra.get("labels") or ()]
    session.restore(learner, channels=channels, windows=windows, labels=None if fixed else labels)
    _say(
        f"resuming from --checkpoint {path}: {describe_state(learner)}; {windows:,} windows seen, "
        f"{channels} channel(s), classes {', '.join(labels) or '-'}"
    )
    return {"windows": windows, "labels": labels, **restored_counters(learner)}


def restored_counters(learner: Learner) -> dict[str, Any]:
    """A restored learner's counters, for the summary's ``resumed`` field."""
    state = learner.state.to_dict()
    state.pop("accuracy_matrix")
    state.pop("baseline")
    return state


def _say(text: str) -> None:
    """A line for people on stderr; user-supplied text in it is never read as markup."""
    console.print(text, markup=False, highlight=False)


# -- stopping ---------------------------------------------------------------------------------------------


@dataclass
class _Until:
    items: Iterable[Any]
    stop: threading.Event
    exhausted: bool = False

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            if self.stop.is_set():
                return
            yield item
        self.exhausted = True


def until(stop: threading.Event, items: Iterable[Any]) -> _Until:
    """``items`` until ``stop`` is set (checked before each); ``.exhausted`` says whether all came."""
    return _Until(items, stop)


# -- a scenario, from any experience -------------------------------------------------------------------------


@dataclass
class ScenarioProgress:
    """How far :func:`learn_scenario` got: experiences completed (in total, resumed ones included)."""

    completed: int
    total: int

    @property
    def finished(self) -> bool:
        return self.completed == self.total


def learn_scenario(
    learner: Learner,
    scenario: Scenario,
    *,
    start: int,
    batch_size: int,
    seed: int,
    stop: threading.Event,
    on_result: Callable[[ObserveResult], None] | None = None,
    on_experience: Callable[[int, list[float]], None] | None = None,
) -> ScenarioProgress:
    """:func:`ondevice.continual.run_scenario`'s loop from experience ``start`` on, stopping between batches.

    Each experience is streamed in the same seeded order as ``run_scenario`` (``seed + i``), so a run
    resumed after experience ``start - 1`` continues exactly as an uninterrupted one; the baseline is
    measured only at the very start. An experience cut short by ``stop`` is neither ended nor measured.
    """
    exps = scenario.experiences
    if start == 0:
        learner.record_accuracies([learner.accuracy(e.test) for e in exps], baseline=True)
    completed = start
    for i in range(start, len(exps)):
        if stop.is_set():
            break
        items = until(stop, Stream(exps[i].train, batch_size=batch_size, shuffle=True, seed=seed + i))
        learner.learn(items, on_result=on_result)
        if not items.exhausted:
            break
        learner.end_experience()
        row = [learner.accuracy(e.test) for e in exps]
        learner.record_accuracies(row)
        completed = i + 1
        if on_experience is not None:
            on_experience(i, row)
    return ScenarioProgress(completed, len(exps))


def scenario_summary(learner: Learner, scenario: Scenario, progress: ScenarioProgress) -> dict[str, Any]:
    """The figures of ``run_scenario``'s :class:`ContinualResult` over the whole run (resumed part too);
    after an interruption only the accuracy-matrix rows measured so far and the stream counters."""
    state = learner.state
    exps = scenario.experiences
    matrix = state.accuracy_matrix[-progress.completed :] if progress.completed else []
    if not progress.finished:
        return {
            "accuracy_matrix": matrix,
            "baseline": state.baseline,
            "experiences_completed": progress.completed,
            "experiences_total": progress.total,
            "samples": state.trained_samples,
            "seconds": state.train_seconds,
            "samples_per_second": state.samples_per_second,
            "buffer_bytes": learner.buffer_bytes,
            "prequential_accuracy": state.prequential_accuracy,
            "drifts": state.drifts,
        }
    buffer = learner.buffer
    all_test = TensorData(torch.cat([e.test.x for e in exps]), torch.cat([e.test.y for e in exps]))
    result = ContinualResult(
        metrics=ContinualMetrics.from_matrix(matrix, state.baseline),
        final_accuracy=learner.accuracy(all_test),
        samples=state.trained_samples,
        seconds=state.train_seconds,
        samples_per_second=state.samples_per_second,
        buffer_bytes=learner.buffer_bytes,
        buffer_samples=(buffer.capacity or 0) if buffer is not None else 0,
        bytes_per_sample=buffer.bytes_per_sample() if buffer is not None and buffer.sample_shape else 0,
        prequential_accuracy=state.prequential_accuracy,
        drifts=state.drifts,
    )
    return {
        **result.to_dict(),
        "experiences_completed": progress.completed,
        "experiences_total": progress.total,
    }


def run_scenario_from(
    learner: Learner,
    scenario: Scenario,
    record: Mapping[str, Any] | None,
    *,
    path: str | None,
    flags: Mapping[str, Any],
    batch_size: int,
    seed: int,
    stop: threading.Event,
    track: Callable[[int], AbstractContextManager[Callable[[ObserveResult], None]]],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Stream ``scenario`` from the start, or after the experience ``record`` (a resumed checkpoint's
    ``extra``) completed; save to ``path`` after each experience; the summary (so far, if stopped)."""
    exps = scenario.experiences
    start = int(record[RECORD_KEY]["experience"]) + 1 if record is not None else 0
    if record is not None:
        left = f"continuing with experience {start}" if start < len(exps) else "nothing left to learn"
        say(
            f"resuming from --checkpoint {path}: {describe_state(learner)}; experiences 0-{start - 1} of "
            f"{len(exps)} done, {left}"
        )

    def save(index: int, row: list[float]) -> None:
        if path:
            learner.save(
                path, extra={RECORD_KEY: {"flags": dict(flags), "experience": index}, "experience": index}
            )

    with track(sum(len(e.train) for e in exps[start:])) as on_result:
        reached = learn_scenario(
            learner,
            scenario,
            start=start,
            batch_size=batch_size,
            seed=seed,
            stop=stop,
            on_result=on_result,
            on_experience=save,
        )
    summary = scenario_summary(learner, scenario, reached)
    summary["checkpoint"] = path if path and reached.completed else None
    return summary


def run_rows_from(
    learner: Learner,
    data: TensorData,
    record: Mapping[str, Any] | None,
    *,
    name: str,
    path: str | None,
    flags: Mapping[str, Any],
    batch_size: int,
    save_every: int,
    stop: threading.Event,
    track: Callable[[int], AbstractContextManager[Callable[[ObserveResult], None]]],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Learn the data file ``name`` in file order, after the rows ``record`` says were learned when the
    file starts with them; save to ``path`` every ``save_every`` samples, at the end and when stopped."""
    cursor = RowCursor.resume(data, record[RECORD_KEY].get("rows") if record is not None else None)
    if record is not None:
        if cursor.rows == len(data):
            where = f"all {len(data):,} rows of {name} were learned already: nothing to learn"
        elif cursor.rows:
            where = f"continuing {name} after row {cursor.rows:,} of {len(data):,}"
        else:
            where = f"{name} does not start with the rows learned before: learning all of it as new data"
        say(f"resuming from --checkpoint {path}: {describe_state(learner)}; {where}")

    def save() -> None:
        if path:
            learner.save(path, extra={RECORD_KEY: {"flags": dict(flags), "rows": cursor.to_dict()}})

    with track(len(data) - cursor.rows) as on_result:
        learn_rows(
            learner,
            data,
            cursor,
            batch_size=batch_size,
            stop=stop,
            on_result=on_result,
            save=save,
            save_every=save_every,
        )
    save()
    state = learner.state
    return {
        "samples": state.trained_samples,
        "rows_learned": cursor.rows,
        "seconds": state.train_seconds,
        "samples_per_second": state.samples_per_second,
        "prequential_accuracy": state.prequential_accuracy,
        "buffer_bytes": learner.buffer_bytes,
        "drifts": state.drifts,
        "checkpoint": path,
    }


# -- a data file, from any row ---------------------------------------------------------------------------


def _row_bytes(data: TensorData, start: int, stop: int) -> tuple[bytes, bytes]:
    x = data.x[start:stop].contiguous().reshape(-1)
    y = data.y[start:stop].contiguous().reshape(-1)
    return x.numpy().tobytes(), y.numpy().tobytes()


@dataclass
class RowCursor:
    """Rows of a data file learned so far and a SHA-256 digest of them (features and labels).

    The digest lets a rerun tell whether a file starts with the rows already learned (the same file, or
    one that grew): then it continues after them; any other file is new data, learned from its first row.
    """

    rows: int = 0
    _x: Any = field(default_factory=hashlib.sha256, repr=False)
    _y: Any = field(default_factory=hashlib.sha256, repr=False)

    def advance(self, data: TensorData, count: int) -> None:
        x, y = _row_bytes(data, self.rows, self.rows + count)
        self._x.update(x)
        self._y.update(y)
        self.rows += count

    @property
    def digest(self) -> str:
        return f"{self._x.hexdigest()}:{self._y.hexdigest()}"

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "digest": self.digest}

    @classmethod
    def resume(cls, data: TensorData, saved: Mapping[str, Any] | None) -> RowCursor:
        """Where to continue in ``data`` after the rows ``saved`` describes (row 0 if it is other data)."""
        rows = saved.get("rows") if saved else None
        cursor = cls()
        if not isinstance(rows, int) or not 0 < rows <= len(data):
            return cursor
        cursor.advance(data, rows)
        return cursor if cursor.digest == saved.get("digest") else cls()  # type: ignore[union-attr]


def learn_rows(
    learner: Learner,
    data: TensorData,
    cursor: RowCursor,
    *,
    batch_size: int,
    stop: threading.Event,
    on_result: Callable[[ObserveResult], None] | None = None,
    save: Callable[[], None] | None = None,
    save_every: int = 0,
) -> bool:
    """Learn ``data`` in file order from ``cursor.rows`` on, ``batch_size`` rows per observe, until ``stop``;
    ``save()`` after every ``save_every`` samples learned (0: never here). True when every row was learned."""
    since_save = 0
    while cursor.rows < len(data):
        if stop.is_set():
            return False
        end = min(cursor.rows + batch_size, len(data))
        result = learner.observe(data.x[cursor.rows : end], data.y[cursor.rows : end])
        cursor.advance(data, end - cursor.rows)
        if on_result is not None:
            on_result(result)
        since_save += result.samples
        if save is not None and save_every and since_save >= save_every:
            save()
            since_save = 0
    return True
