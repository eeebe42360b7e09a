"""Test-wide settings: deterministic, quiet, offline, with private caches and Flower homes."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
