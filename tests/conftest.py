"""Test-wide settings: deterministic, quiet, offline, with private caches and Flower homes."""

from __future__ import annotations

import os
from pathlib import Path

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
# Pretrained backbones are cached per checkout, so a second test run reuses them.
os.environ.setdefault(
    "ONDEVICE_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "ondevice")
)


torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
