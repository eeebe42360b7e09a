"""SIGKILL a learner process mid-stream, between and during saves; it resumes from the last complete one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ondevice.continual.state import read_learner_state, tensor_digest

WORKER = Path(__file__).with_name("_kill_worker.py")
SAMPLES = 120  # 20 batches of 6


def _start(state: Path, log: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(state), str(log), str(SAMPLES)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


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


def _kill_while_saving(proc: subprocess.Popen[str], directory: Path, timeout_s: float = 60) -> None:
    """SIGKILL as soon as a temporary checkpoint file shows up (the write is in flight)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.endswith(".tmp") for p in directory.iterdir()):
            proc.send_signal(signal.SIGKILL)
            return
    proc.send_signal(signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.integration
def test_sigkill_at_random_points_resumes_from_the_last_complete_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(1234)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    state, log = run_dir / "state.safetensors", tmp_path / "intents.log"
    positions = []
    for attempt in range(3):
        proc = _start(state, log)
        # Wait for the first batch after (re)start, so every kill lands mid-stream.
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.strip(), proc.stderr.read() if proc.stderr else ""
        if attempt % 2 == 0:
            time.sleep(rng.uniform(0.0, 0.3))  # anywhere: between or during saves
            proc.send_signal(signal.SIGKILL)
        else:
            _kill_while_saving(proc, run_dir)
        proc.wait(timeout=60)
        assert proc.returncode in (-signal.SIGKILL, 0)
        position = _check_survivor(state, log)
        assert 0 < position <= SAMPLES
        positions.append(position)
    assert positions == sorted(positions), "a restart went back further than its checkpoint"
    # Let the last process finish: the stream continues from the checkpoint to the end.
    proc = _start(state, log)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    resumed = [int(v) for v in out.split()]
    assert not resumed or resumed[0] > positions[-1]
    assert _check_survivor(state, log) == SAMPLES
    # An uninterrupted run ends in exactly the same state.
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    ref = _start(ref_dir / "state.safetensors", tmp_path / "reference.log")
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    ours = tensor_digest(read_learner_state(state)[0])
    theirs = tensor_digest(read_learner_state(ref_dir / "state.safetensors")[0])
    assert ours == theirs
