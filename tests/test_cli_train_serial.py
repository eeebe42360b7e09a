"""``ondevice train --serial``: a real pty pair, a board thread printing forwarder lines, the CLI learning."""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import ondevice
from devices.lines import parse_line, windows
from devices.ports import open_pty
from devices.session import SessionConfig
from devices.testing.emulator import sensor_lines
from ondevice import Learner
from ondevice.cli import app
from ondevice.cli.train import _as_flags
from ondevice.continual.state import read_learner_state
from ondevice.errors import ConfigError

runner = CliRunner()

CLASSES = ("idle", "wave", "shake")  # sines of amplitude 1, 2, 3 and 1, 2, 3 cycles per 32 readings
WINDOW = 16
SEGMENT = 32  # readings per class run: two whole windows
READINGS = 8 * SEGMENT * len(CLASSES)  # 768 readings, 48 windows
CUT = b"2.5,0.1,wa"  # the tail of a line the host opened the port in the middle of: dropped as "resync"
NOISE = {  # reading index -> (line written after it, the reason it is dropped)
    40: (b"\xff\xfe\x80garbage\x81", "undecodable"),
    100: (b"0.1,oops,0.3,idle", "non_numeric"),
    170: (b"0.1,0.2,wave", "column_count"),
    250: (b"", "empty"),
    333: (b"9" * 1500, "overlong"),
    400: (b"\xc3\x28,1,2,idle", "undecodable"),
}


def forwarder_bytes(readings: int) -> bytes:
    """What the board prints: a cut line, then ``readings`` labelled lines with garbage in between."""
    lines = sensor_lines(readings, channels=3, classes=CLASSES, segment=SEGMENT, label_column=-1)
    out = [CUT]
    for i, line in enumerate(lines):
        out.append(line.encode())
        if i in NOISE:
            out.append(NOISE[i][0])
    return b"\n".join(out) + b"\n"


class Board:
    """The device end of a raw pty pair: waits until the host opens the port, then writes ``data``.

    pyserial flushes the input queue when it opens a port; the master end, in packet mode (TIOCPKT),
    reports that flush, so the board starts writing exactly when the host listens, as a sketch that
    waits for DTR would. Writes block while the host is busy learning (no line is lost).
    """

    def __init__(self, data: bytes) -> None:
        self.port, self.path = open_pty()
        fcntl.ioctl(self.port.fd, termios.TIOCPKT, struct.pack("i", 1))
        self.data = data
        self.opened = threading.Event()
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="board", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd = self.port.fd
        try:
            while not self._stop.is_set() and not self.opened.is_set():
                if select.select([fd], [], [], 0.05)[0] and os.read(fd, 64)[0] & termios.TIOCPKT_FLUSHREAD:
                    self.opened.set()
            view = memoryview(self.data)
            while view and not self._stop.is_set():
                if select.select([], [fd], [], 0.05)[1]:
                    written = os.write(fd, view[:61])  # small writes: the host sees partial lines
                    view = view[written:]
                    self.written += written
        except OSError:  # closed under us at the end of a test
            return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.port.close()


@pytest.fixture
def board_factory() -> Iterator[Callable[[bytes], Board]]:
    boards: list[Board] = []

    def make(data: bytes) -> Board:
        boards.append(Board(data))
        return boards[-1]

    yield make
    for board in boards:
        board.close()


def restore(path: Path) -> tuple[Learner, dict[str, Any]]:
    """Rebuild the learner from ``path`` the way a user would: the model described in the checkpoint."""
    _, metadata = read_learner_state(path)
    extra = metadata["extra"]
    model = ondevice.create_model(extra["model"], **extra["model_kwargs"])
    return Learner.restore(path, ondevice.prepare(model, "full")), extra


def test_serial_training_learns_the_windows_and_counts_what_it_drops(board_factory, tmp_path: Path) -> None:
    board = board_factory(forwarder_bytes(READINGS))
    state = tmp_path / "state.safetensors"
    result = runner.invoke(
        app,
        [
            "train",
            "--serial",
            board.path,
            "--window",
            str(WINDOW),
            "--max-samples",
            str(READINGS),
            "--checkpoint",
            str(state),
            "--checkpoint-every",
            "10",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert board.opened.is_set()
    out = json.loads(result.stdout)

    # Every reading the board sent was read, every line it could not use was dropped once, by reason.
    expected_drops = Counter(reason for _, reason in NOISE.values()) + Counter(resync=1)
    assert out["samples"] == READINGS and out["channels"] == 3 and out["stopped_by"] == "max_samples"
    assert out["dropped"] == dict(expected_drops) and out["dropped_total"] == len(NOISE) + 1
    assert out["lines"] == READINGS + len(NOISE) + 1
    assert out["sampling_rate_hz"] > 0

    # The windows the readings imply were all learned, labels numbered in order of appearance.
    assert out["windows"] == out["windows_learned"] == (READINGS - WINDOW) // WINDOW + 1 == 48
    assert out["windows_skipped"] == {} and out["hop"] == WINDOW
    assert out["labels"] == list(CLASSES) and out["classes"] == len(CLASSES)
    assert out["buffer_bytes"] > 0 and out["samples_per_second"] > 0

    # It learned: predicted before learning, it is mostly right (chance is 1/3) ...
    assert out["prequential_accuracy"] > 0.6 and out["recent_accuracy"] > 0.7

    # ... and the checkpoint, rebuilt from its own description, classifies windows it never saw (other
    # noise) correctly.
    assert out["checkpoint"] == str(state)
    learner, extra = restore(state)
    assert learner.state.trained_samples == 48 and extra["labels"] == list(CLASSES)
    fresh = sensor_lines(SEGMENT * 6, channels=3, classes=CLASSES, segment=SEGMENT, label_column=-1, seed=7)
    pairs = list(
        windows((parse_line(line, label_column=-1) for line in fresh), WINDOW, labels=extra["labels"])
    )
    x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    assert y.tolist() == [0, 0, 1, 1, 2, 2] * 2 and learner.accuracy((x, y)) >= 11 / 12


def test_serial_training_stops_after_duration_on_a_silent_line(tmp_path: Path) -> None:
    state = tmp_path / "state.safetensors"
    result = runner.invoke(
        app, ["train", "--serial", "loop://", "--duration", "0.3", "--checkpoint", str(state), "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["stopped_by"] == "duration" and out["samples"] == out["windows"] == out["windows_learned"] == 0
    assert out["prequential_accuracy"] is None and out["checkpoint"] is None and not state.exists()


def test_serial_summary_table_for_people(board_factory) -> None:
    board = board_factory(forwarder_bytes(4 * WINDOW))
    result = runner.invoke(
        app, ["train", "--serial", board.path, "--window", str(WINDOW), "--max-samples", "64"]
    )
    assert result.exit_code == 0, result.output
    for row in ("readings (samples) read", "windows learned", "4 of 4", "dropped: resync", "sampling rate"):
        assert row in result.output
    assert "max samples" in result.output


def test_labels_fix_the_head_order_and_skip_other_classes(board_factory) -> None:
    board = board_factory(forwarder_bytes(3 * SEGMENT))  # windows: idle idle wave wave shake shake
    args = ["--window", str(WINDOW), "--max-samples", str(3 * SEGMENT), "--labels", "wave,idle", "--json"]
    result = runner.invoke(app, ["train", "--serial", board.path, *args])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["windows"] == 6 and out["windows_learned"] == 4 and out["windows_skipped"] == {"unlabelled": 2}
    assert out["labels"] == ["wave", "idle"] and out["classes"] == 2


def test_a_sensor_column_read_as_the_label_is_a_clear_error(board_factory) -> None:
    board = board_factory(b"".join(f"{i},{i / 2},{i / 4}\n".encode() for i in range(300)))
    args = ["--window", "5", "--hop", "1", "--strategy", "naive", "--max-samples", "300"]
    result = runner.invoke(app, ["train", "--serial", board.path, *args])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "label column -1" in text and "101 different labels" in text and "--label-column INDEX" in text
    assert "Traceback" not in result.output


@pytest.mark.integration
def test_ctrl_c_stops_cleanly_saves_and_summarises(board_factory, tmp_path: Path) -> None:
    board = board_factory(forwarder_bytes(20 * READINGS))
    state = tmp_path / "state.safetensors"
    exe = Path(sys.executable).parent / "ondevice"
    command = [str(exe), "train", "--serial", board.path, "--window", str(WINDOW), "--json"]
    command += ["--checkpoint", str(state), "--checkpoint-every", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not state.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.exists(), "no window was learned"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr  # 128 + SIGINT, as after any interrupted command
    assert "Traceback" not in stderr
    out = json.loads(stdout)
    assert out["stopped_by"] == "interrupted" and out["checkpoint"] == str(state)
    assert out["windows_learned"] >= 1 and out["samples"] >= WINDOW
    learner, _ = restore(state)
    assert learner.state.trained_samples == out["windows_learned"]  # saved at the stop, not only periodically


def test_a_rerun_resumes_the_sensor_learner_with_its_classes_and_counters(
    board_factory, tmp_path: Path
) -> None:
    state = tmp_path / "state.safetensors"
    args = ["--window", str(WINDOW), "--checkpoint", str(state), "--json"]
    first = board_factory(forwarder_bytes(READINGS // 2))  # idle, wave, shake: 24 windows
    result = runner.invoke(app, ["train", "--serial", first.path, "--max-samples", str(READINGS // 2), *args])
    assert result.exit_code == 0, result.output
    before = json.loads(result.stdout)
    assert before["windows_learned"] == 24 and before["resumed"] is None
    saved, _ = restore(state)

    # The next run reads only "shake" and "idle" lines: the classes keep their head rows.
    lines = sensor_lines(SEGMENT * 6, channels=3, classes=CLASSES, segment=SEGMENT, label_column=-1)
    later = [line for line in lines if not line.endswith(",wave")][: 4 * SEGMENT]
    second = board_factory(b"\n".join([CUT, *(line.encode() for line in later)]) + b"\n")
    stop = ["--max-samples", str(len(later)), "--duration", "120"]  # the duration only guards against a hang
    result = runner.invoke(app, ["train", "--serial", second.path, *stop, *args])
    assert result.exit_code == 0, result.output
    after = json.loads(result.stdout)
    err = " ".join(result.stderr.split())
    assert f"resuming from --checkpoint {state}: 24 samples learned" in err and "24 windows seen" in err
    assert after["resumed"]["trained_samples"] == 24
    assert after["windows"] == 24 + 8 and after["windows_learned"] == 24 + 8  # counters continue
    assert after["labels"] == list(CLASSES) and after["classes"] == 3
    learner, extra = restore(state)
    assert learner.state.trained_samples == 32 and extra["labels"] == list(CLASSES)
    assert learner.state.correct >= saved.state.correct  # the prequential hits carried over

    # Another window length is another model: refused, the checkpoint left alone.
    content = state.read_bytes()
    result = runner.invoke(
        app, ["train", "--serial", "loop://", "--window", "24", "--checkpoint", str(state)]
    )
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "--window 16 there, 24 here" in text and "--fresh" in text and state.read_bytes() == content


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (
            ["--serial", "/dev/ondevice-no-such-port"],
            ["cannot open the serial port '/dev/ondevice-no-such-port'", "plugged in"],
        ),
        (
            ["--serial", "nosuch://device"],
            ["cannot open the serial port 'nosuch://device'", "pyserial rejects"],
        ),
        (["--serial", "loop://", "--window", "0"], ["--window must be at least 1 reading, got 0"]),
        (["--serial", "loop://", "--hop", "-2"], ["--hop must be at least 1 reading, got -2"]),
        (
            ["--serial", "loop://", "--window", "4"],
            ["--window 4 is too short to train the cnn1d"],
        ),
        (["--serial", "loop://", "--data", "data.csv"], ["exactly one of", "--data and --serial"]),
        (["--serial", "loop://", "--scenario", "sensor"], ["exactly one of", "--scenario and --serial"]),
        (["--data", "data.csv", "--max-samples", "10"], ["--max-samples applies only to --serial"]),
        (["--serial", "loop://", "--model", "cnn"], ["--model 'cnn' is not supported"]),
        (["--serial", "loop://", "--strategy", "gdumb"], ["unknown strategy 'gdumb'"]),
        (["--serial", "loop://", "--labels", "idle,,wave"], ["--labels must be comma-separated"]),
    ],
)
def test_bad_serial_input_is_a_clear_error_not_a_traceback(args: list[str], needles: list[str]) -> None:
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # rich wraps long messages
    for needle in needles:
        assert needle in text
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("url", " ", "--serial"),
        ("window", 0, "--window"),
        ("hop", 0, "--hop"),
        ("baudrate", 0, "--baud"),
        ("max_samples", 0, "--max-samples"),
        ("duration_s", -1.0, "--duration"),
        ("labels", ("idle", "idle"), "--labels"),
        ("batch_size", 0, "--batch-size"),
        ("checkpoint_every", -1, "--checkpoint-every"),
    ],
)
def test_session_config_names_its_fields_and_the_cli_its_flags(field: str, value: Any, flag: str) -> None:
    """The library's error names the field a program sets; the CLI's names the flag its user typed."""
    kwargs: dict[str, Any] = {"url": "loop://", field: value}
    with pytest.raises(ConfigError) as caught:
        SessionConfig(**kwargs)
    message = str(caught.value)
    assert message.startswith(f"SessionConfig.{field} ") and "--" not in message
    assert _as_flags(message).startswith(f"{flag} ") and "SessionConfig" not in _as_flags(message)
