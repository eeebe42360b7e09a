"""Test-wide settings: deterministic, quiet, offline, with private caches and Flower homes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Small models on 2 cores: one intra-op thread per process avoids OpenMP spin-waits when the suite's own
# subprocesses (Flower, learners) compete for the cores. Set before torch is imported, inherited by children.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest
import torch

# Flower must never reach out or install anything during tests.
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
ROOT = Path(__file__).resolve().parent.parent
# Pretrained backbones are cached per checkout, so a second test run reuses them.
os.environ.setdefault("ONDEVICE_CACHE_DIR", str(ROOT / ".cache" / "ondevice"))


torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


BenchRunner = Callable[..., dict[str, Any]]


@pytest.fixture
def run_bench() -> BenchRunner:
    """Run ``bench/<script>`` with ``args`` in a fresh interpreter; its ``--json`` output, parsed (the run
    must succeed: its stderr tail is the failure message)."""

    def run(script: str, *args: str, timeout: float = 600) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, str(ROOT / "bench" / script), *args, "--json"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    return run
