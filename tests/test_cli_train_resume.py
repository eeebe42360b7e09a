"""``ondevice train --checkpoint``: checked before any work, resumed on a rerun, kept on Ctrl-C; seeded runs.

Real files, real processes: the CLI in-process through typer's runner, and as a child process that gets
a real SIGINT. A resumed run is compared with an uninterrupted one trained from the same data.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import ondevice
from ondevice.cli import app
from ondevice.continual import create_learner
from ondevice.continual.state import read_learner_state
from ondevice.data import load_digits

runner = CliRunner()

TIMING = {"seconds", "samples_per_second", "total_seconds", "learn_seconds", "train_seconds"}


def write_csv(path: Path, rows: slice, *, features: int = 64) -> Path:
    """Digits scanned into 64-step series (the first ``features`` steps), label = digit % 3, with a header."""
    digits = load_digits(layout="sequence")
    x, y = digits.x[rows, 0, :features].numpy(), digits.y[rows].numpy() % 3
    header = ",".join([f"f{i}" for i in range(features)] + ["label"])
    np.savetxt(path, np.concatenate([x, y[:, None]], axis=1), delimiter=",", header=header, comments="")
    return path


def train(*args: str) -> tuple[int, dict[str, Any] | None, str]:
    """Run ``ondevice train ARGS --json``: exit code, the JSON summary (None if none), stderr."""
    result = runner.invoke(app, ["train", *args, "--json"])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    payload = json.loads(result.stdout) if result.stdout.strip() else None
    return result.exit_code, payload, " ".join(result.stderr.split())


def figures(payload: dict[str, Any]) -> dict[str, Any]:
    """The summary without wall-clock figures and run-specific fields."""
    return {k: v for k, v in payload.items() if k not in TIMING | {"resumed", "checkpoint", "title"}}


def learner_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: Path, b: Path) -> None:
    left, right = learner_tensors(a), learner_tensors(b)
    assert left.keys() == right.keys()
    for name in left:
        assert torch.allclose(left[name].double(), right[name].double(), rtol=1e-5, atol=1e-6), name


# -- 1: the checkpoint path is checked before any work ----------------------------------------------------


def _notes(tmp: Path) -> Path:
    path = tmp / "notes.txt"
    path.write_text("my notes: do not overwrite\n")
    return path


def _directory(tmp: Path) -> Path:
    path = tmp / "somedir"
    path.mkdir()
    return path


def _delta(tmp: Path) -> Path:
    path = tmp / "model.delta.safetensors"
    torch.manual_seed(0)
    prepared = ondevice.prepare(ondevice.create_model("cnn1d", num_classes=3, length=64), "full")
    prepared.save_delta(path)
    return path


def _damaged(tmp: Path) -> Path:
    path = tmp / "learner.safetensors"
    code, _, _ = train("--data", str(write_csv(tmp / "seed.csv", slice(0, 30))), "--checkpoint", str(path))
    assert code == 0
    data = bytearray(path.read_bytes())
    data[-100:] = bytes(100)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (_notes, "not a safetensors file"),
        (_directory, "is a directory"),
        (_delta, "is a delta checkpoint, expected learner"),
        (_damaged, "damaged"),
    ],
)
def test_a_bad_checkpoint_path_is_refused_before_anything_is_trained(tmp_path: Path, make, needle) -> None:
    target = make(tmp_path)
    before = None if target.is_dir() else target.read_bytes()
    data = write_csv(tmp_path / "data.csv", slice(0, 60))
    code, payload, err = train("--data", str(data), "--checkpoint", str(target))
    assert code == 2 and payload is None  # nothing trained, no summary
    assert f"--checkpoint '{target}'" in err and needle in err
    assert (target.is_dir() and not list(target.iterdir())) or target.read_bytes() == before


# -- 3: seeded ------------------------------------------------------------------------------------------


def test_train_data_gives_the_same_figures_on_every_run_with_the_same_seed(tmp_path: Path) -> None:
    data = write_csv(tmp_path / "data.csv", slice(0, 200))
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(hash(name) % 1000)  # whatever the global generators hold before the run
        np.random.seed(hash(name) % 1000)
        state = tmp_path / f"{name}.safetensors"
        code, payload, _ = train("--data", str(data), "--seed", "3", "--checkpoint", str(state))
        assert code == 0 and payload is not None
        runs.append((figures(payload), state))
    assert runs[0][0] == runs[1][0]
    assert_same_tensors(runs[0][1], runs[1][1])


# -- 2: resuming ----------------------------------------------------------------------------------------


def test_a_rerun_resumes_the_data_file_and_continues_as_an_uninterrupted_run(tmp_path: Path) -> None:
    first = write_csv(tmp_path / "first.csv", slice(0, 150))
    grown = write_csv(tmp_path / "grown.csv", slice(0, 300))  # the same rows, then 150 more
    reference = tmp_path / "reference.safetensors"
    code, straight, _ = train("--data", str(grown), "--checkpoint", str(reference))
    assert code == 0 and straight is not None and straight["samples"] == 300

    state = tmp_path / "state.safetensors"
    code, part, err = train("--data", str(first), "--checkpoint", str(state))
    assert code == 0 and part is not None and part["samples"] == 150 and "resuming" not in err
    saved = learner_tensors(state)

    code, resumed, err = train("--data", str(grown), "--checkpoint", str(state))
    assert code == 0 and resumed is not None
    assert f"resuming from --checkpoint {state}" in err and "150 samples learned" in err
    assert "continuing" in err and "after row 150 of 300" in err
    assert resumed["resumed"]["trained_samples"] == 150  # what was restored
    assert resumed["samples"] == 300 and resumed["rows_learned"] == 300  # counters continue
    assert figures(resumed) == figures(straight)  # metrics carry over: the same as never stopping
    assert_same_tensors(state, reference)
    head = "delta/classifier.weight"
    assert not torch.equal(learner_tensors(state)[head], saved[head])  # it went on learning

    # Rerun once more: nothing new in the file, nothing changes.
    code, again, err = train("--data", str(grown), "--checkpoint", str(state))
    assert code == 0 and again is not None and "nothing to learn" in err
    assert again["samples"] == 300 and again["prequential_accuracy"] == straight["prequential_accuracy"]
    assert_same_tensors(state, reference)

    # Another file with the same columns is new data: learned from its first row, after what was learned.
    other = write_csv(tmp_path / "other.csv", slice(300, 340))
    code, more, err = train("--data", str(other), "--checkpoint", str(state))
    assert code == 0 and more is not None and "learning all of it" in err and more["samples"] == 340

    # --fresh starts over and replaces the checkpoint.
    code, fresh, err = train("--data", str(grown), "--checkpoint", str(state), "--fresh")
    assert code == 0 and fresh is not None and "resuming" not in err
    assert fresh["resumed"] is None and figures(fresh) == figures(straight)
    assert_same_tensors(state, reference)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--strategy", "naive"], ["--strategy 'replay' there, 'naive' here"]),
        (["--seed", "5", "--lr", "0.1"], ["--lr 0.01 there, 0.1 here", "--seed 0 there, 5 here"]),
        (["--scheme", "last_layer"], ["--scheme 'full' there, 'last_layer' here"]),
    ],
)
def test_an_incompatible_checkpoint_is_refused_and_left_alone(tmp_path: Path, args, needles) -> None:
    data = write_csv(tmp_path / "data.csv", slice(0, 40))
    state = tmp_path / "state.safetensors"
    assert train("--data", str(data), "--checkpoint", str(state))[0] == 0
    before = state.read_bytes()
    code, payload, err = train("--data", str(data), "--checkpoint", str(state), *args)
    assert code == 2 and payload is None
    for needle in [*needles, "was saved by a different run", "--fresh", "another --checkpoint path"]:
        assert needle in err
    assert state.read_bytes() == before


def test_a_checkpoint_for_another_feature_count_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state.safetensors"
    wide = write_csv(tmp_path / "a.csv", slice(0, 40))
    assert train("--data", str(wide), "--checkpoint", str(state))[0] == 0
    narrow = write_csv(tmp_path / "b.csv", slice(0, 40), features=36)
    code, _, err = train("--data", str(narrow), "--checkpoint", str(state))
    assert code == 2 and "feature columns of --data 64 there, 36 here" in err and "--fresh" in err


def test_a_learner_checkpoint_not_written_by_train_is_not_resumed(tmp_path: Path) -> None:
    state = tmp_path / "learner.safetensors"
    prepared = ondevice.prepare(ondevice.create_model("cnn1d", num_classes=3, length=64), "full")
    create_learner(prepared, "replay").save(state)
    data = write_csv(tmp_path / "a.csv", slice(0, 40))
    code, _, err = train("--data", str(data), "--checkpoint", str(state))
    assert code == 2 and "not saved by `ondevice train`" in err and "--fresh" in err


# -- 4: NaN/Inf batches in the summary -------------------------------------------------------------------


def test_the_summary_counts_batches_skipped_for_nan_or_inf(tmp_path: Path) -> None:
    data = write_csv(tmp_path / "data.csv", slice(0, 40))
    lines = data.read_text().splitlines()
    lines[3] = "nan," + lines[3].split(",", 1)[1]  # sample 2: first batch of 10
    lines[25] = "inf," + lines[25].split(",", 1)[1]  # sample 24: third batch
    data.write_text("\n".join(lines) + "\n")
    code, payload, _ = train("--data", str(data), "--strategy", "naive")
    assert code == 0 and payload is not None and payload["skipped_batches"] == 2
    result = runner.invoke(app, ["train", "--data", str(data), "--strategy", "naive"])
    assert result.exit_code == 0
    row = next(line for line in result.output.splitlines() if "batches skipped (NaN/Inf)" in line)
    assert row.split("│")[-2].strip() == "2"


# -- 5: bad input: an error naming the flag, never a traceback, never markup ------------------------------


def _binary(tmp: Path) -> str:
    path = tmp / "binary.csv"
    path.write_bytes(bytes(range(256)) * 8)
    return str(path)


def _words(tmp: Path) -> str:
    path = tmp / "words.csv"
    path.write_text("a,b,label\nhello,world,cat\n1,2,0\n")
    return str(path)


def _truncated_npy(tmp: Path) -> str:
    path = tmp / "cut.npy"
    np.save(path, np.ones((100, 5), dtype=np.float32))
    path.write_bytes(path.read_bytes()[:200])
    return str(path)


def _huge_label(tmp: Path) -> str:
    path = tmp / "labels.csv"
    path.write_text("0.1,0.2,3\n0.3,0.4,1234567\n")
    return str(path)


def _folder(tmp: Path) -> str:
    path = tmp / "folder.csv"
    path.mkdir()
    return str(path)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda tmp: str(tmp / "[x].csv"), "[x].csv' does not exist"),
        (lambda tmp: str(tmp / "a[/x].csv"), "a[/x].csv' does not exist"),
        (_binary, "--data"),
        (_words, "numeric table"),
        (_truncated_npy, "--data"),
        (_huge_label, "label 1234567"),
        (_folder, "--data cannot read"),
    ],
)
def test_bad_data_files_are_clear_errors_not_tracebacks(tmp_path: Path, make, needle) -> None:
    result = runner.invoke(app, ["train", "--data", make(tmp_path)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "--data" in text and needle in text
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# -- Ctrl-C: stop between batches, save, summarise, exit 130 -----------------------------------------------


def _interrupt_after_first_save(command: list[str], state: Path) -> tuple[int, str, str]:
    """Start ``command``, wait until it has saved ``state`` once, send SIGINT; (code, stdout, stderr)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not state.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.exists(), process.communicate(timeout=60)[1]
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    return process.returncode, stdout, stderr


def _ondevice() -> str:
    return str(Path(sys.executable).parent / "ondevice")


@pytest.mark.integration
def test_ctrl_c_stops_a_data_run_saves_it_and_prints_the_summary_so_far(tmp_path: Path) -> None:
    rows = 50_000  # far more than can be learned before the signal lands
    digits = load_digits(layout="sequence")
    x = digits.x[:, 0, :16].numpy().repeat(rows // len(digits) + 1, axis=0)[:rows]
    y = (digits.y.numpy() % 3).repeat(rows // len(digits) + 1)[:rows]
    data = tmp_path / "long.npy"
    np.save(data, np.concatenate([x, y[:, None]], axis=1).astype(np.float32))
    state = tmp_path / "state.safetensors"
    command = [_ondevice(), "train", "--data", str(data), "--strategy", "naive", "--json"]
    command += ["--checkpoint", str(state), "--checkpoint-every", "10"]
    code, stdout, stderr = _interrupt_after_first_save(command, state)
    assert code == 130, stderr
    assert "Traceback" not in stderr
    out = json.loads(stdout)
    assert out["stopped_by"] == "interrupted" and out["checkpoint"] == str(state)
    assert 10 <= out["rows_learned"] < rows and out["samples"] == out["rows_learned"]
    _, metadata = read_learner_state(state)  # saved at the stop, not only every 10 samples
    assert metadata["state"]["trained_samples"] == out["samples"]
    assert metadata["extra"]["train"]["rows"]["rows"] == out["rows_learned"]


@pytest.mark.integration
@pytest.mark.slow
def test_ctrl_c_then_rerun_continues_a_scenario_after_its_last_completed_experience(tmp_path: Path) -> None:
    options = ["--scenario", "sensor", "--pretrain-epochs", "1", "--replay-steps", "8"]
    reference = tmp_path / "reference.safetensors"
    code, straight, _ = train(*options, "--checkpoint", str(reference))
    assert code == 0 and straight is not None and straight["experiences_completed"] == 4

    state = tmp_path / "state.safetensors"
    command = [_ondevice(), "train", *options, "--checkpoint", str(state), "--json"]
    code, stdout, stderr = _interrupt_after_first_save(command, state)
    assert code == 130, stderr
    assert "Traceback" not in stderr
    partial = json.loads(stdout)
    done = partial["experiences_completed"]
    assert partial["stopped_by"] == "interrupted" and 1 <= done < 4
    assert partial["accuracy_matrix"] == straight["accuracy_matrix"][:done]  # the summary so far
    _, metadata = read_learner_state(state)
    assert metadata["extra"]["experience"] == done - 1  # the last completed experience

    code, resumed, err = train(*options, "--checkpoint", str(state))
    assert code == 0 and resumed is not None
    assert f"experiences 0-{done - 1} of 4 done, continuing with experience {done}" in err
    assert figures(resumed) == figures(straight)
    assert_same_tensors(state, reference)
