"""SIGKILL a learner process mid-stream, between and during saves; it resumes from the last complete one.

The child learns only the batches the parent hands it (``--gated``), so it can never finish its stream
before the kill lands, however loaded the machine: every kill is mid-stream by construction. Where in
the batch it lands (learning, logging, writing the temporary file, renaming) is left to chance.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ondevice.continual.state import read_learner_state, tensor_digest

WORKER = Path(__file__).with_name("_kill_worker.py")
BATCH = 6
SAMPLES = 120  # 20 batches of 6
KILLS = 3
MAX_TARGET, MAX_EXTRA = 4, 2  # KILLS * (MAX_TARGET + MAX_EXTRA) batches < 20: a gated child never finishes
SAFETY_S = 300.0  # a guard against a hung child, not a timing assertion


def _start(state: Path, log: Path, *, gated: bool = False) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(state), str(log), str(SAMPLES), *(["--gated"] if gated else [])],
        stdin=subprocess.PIPE if gated else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


class _Progress:
    """The child's progress lines, read on a thread so the parent can poll the disk meanwhile."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        self._thread = threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _pump(self, stdout: object) -> None:
        for line in stdout:  # type: ignore[attr-defined]
            self.lines.put(line)
        self.lines.put("")  # end of output

    def next_position(self) -> int:
        line = self.lines.get(timeout=SAFETY_S)
        assert line.strip(), "the child stopped before learning the batches it was given"
        return int(line)

    def join(self) -> None:
        self._thread.join(timeout=SAFETY_S)


def _grant(proc: subprocess.Popen[str], batches: int) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n" * batches)
    proc.stdin.flush()


def _temporaries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.endswith(".tmp")}


def _kill_while_saving(
    proc: subprocess.Popen[str], directory: Path, progress: _Progress, batches: int
) -> None:
    """SIGKILL once a new temporary checkpoint file shows up (a write is in flight), or, should every
    write slip between two looks, once the child has saved its last granted batch and waits for more."""
    stale = _temporaries(directory)  # a temporary left by an earlier kill does not count
    saved = 0
    deadline = time.monotonic() + SAFETY_S
    while saved < batches and proc.poll() is None and time.monotonic() < deadline:
        if _temporaries(directory) - stale:
            break
        try:
            progress.lines.get_nowait()
            saved += 1
        except queue.Empty:
            pass
    proc.send_signal(signal.SIGKILL)


def _intents(log: Path) -> dict[str, int]:
    if not log.exists():
        return {}
    out = {}
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:  # a kill can cut the last line short; it then names no finished save
            out[parts[1]] = int(parts[0])
    return out


def _check_survivor(state: Path, log: Path) -> int:
    """The state file is a complete, valid checkpoint equal to one that was saved; returns its position."""
    tensors, metadata = read_learner_state(state)  # raises on a truncated or corrupt file
    digest = tensor_digest(tensors)
    intents = _intents(log)
    assert digest in intents, "the surviving checkpoint is not one the learner saved"
    position = int(metadata["state"]["samples_seen"])
    assert intents[digest] == position
    return position


@pytest.mark.slow
@pytest.mark.integration
def test_sigkill_at_random_points_resumes_from_the_last_complete_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(1234)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    state, log = run_dir / "state.safetensors", tmp_path / "intents.log"
    position = 0
    for attempt in range(KILLS):
        proc = _start(state, log, gated=True)
        progress = _Progress(proc)
        target = rng.randint(1, MAX_TARGET)  # batches learned for sure before the kill
        extra = rng.randint(1, MAX_EXTRA)  # batches the child may still learn while the kill is on its way
        _grant(proc, target + extra)
        for batch in range(1, target + 1):
            assert progress.next_position() == position + batch * BATCH
        if attempt % 2 == 0:
            time.sleep(rng.uniform(0.0, 0.3))  # anywhere: learning, between or during saves, or waiting
            proc.send_signal(signal.SIGKILL)
        else:
            _kill_while_saving(proc, run_dir, progress, extra)
        proc.wait(timeout=SAFETY_S)
        progress.join()
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
        survivor = _check_survivor(state, log)
        # Never behind a save the child reported, never past what it was given: killed mid-stream.
        assert position + target * BATCH <= survivor <= position + (target + extra) * BATCH < SAMPLES
        position = survivor
    # Let the last process finish: the stream continues from the checkpoint to the end.
    proc = _start(state, log)
    out, err = proc.communicate(timeout=SAFETY_S)
    assert proc.returncode == 0, err
    resumed = [int(v) for v in out.split()]
    assert resumed == list(range(position + BATCH, SAMPLES + 1, BATCH))
    assert _check_survivor(state, log) == SAMPLES
    # An uninterrupted run ends in exactly the same state.
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    ref = _start(ref_dir / "state.safetensors", tmp_path / "reference.log")
    _, err = ref.communicate(timeout=SAFETY_S)
    assert ref.returncode == 0, err
    ours = tensor_digest(read_learner_state(state)[0])
    theirs = tensor_digest(read_learner_state(ref_dir / "state.safetensors")[0])
    assert ours == theirs
