"""Continual learning on a device: a stream seen once, in order, with new classes and shifting conditions.

The entry points::

    from ondevice.continual import create_learner
    learner = create_learner(prepared, "replay", buffer_size=200)   # or "der" (DER++), "latent-replay"
    for x, y in stream:                      # any iterable of (x, y): samples or small batches
        learner.observe(x, y)
    learner.predict(x_new)
    learner.save("state.safetensors")        # atomic; Learner.restore(path, prepared) after a restart

Pieces: replay buffers (:mod:`~ondevice.continual.buffer`), latent replay
(:mod:`~ondevice.continual.latent`), LwF and online EWC (:mod:`~ondevice.continual.regularizers`), drift
detectors (:mod:`~ondevice.continual.drift`), metrics over the accuracy matrix
(:mod:`~ondevice.continual.metrics`) and digits scenarios (:mod:`~ondevice.continual.scenarios`). The
learner (:mod:`~ondevice.continual.learner`) is built from its settings (:mod:`~.config`), prequential
counters (:mod:`~.prequential`), input coercion (:mod:`~.inputs`), replay use (:mod:`~.replay`), head
growth (:mod:`~.head`), drift hooks (:mod:`~.hooks`) and the named strategies (:mod:`~.strategies`);
its state file is :mod:`~ondevice.continual.state`.
"""

from __future__ import annotations

from ondevice.continual.buffer import (
    BufferConfig,
    ClassBalancedBuffer,
    ReplayBuffer,
    ReplayDraw,
    ReservoirBuffer,
)
from ondevice.continual.drift import ADWIN, DriftDetector, PageHinkley
from ondevice.continual.latent import LatentSplit, SampleCodec, find_boundary
from ondevice.continual.learner import (
    RECIPES,
    STRATEGIES,
    BoostLR,
    DriftEvent,
    Learner,
    LearnerConfig,
    LogDrift,
    ObserveResult,
    SnapshotOnDrift,
    create_learner,
)
from ondevice.continual.metrics import (
    ContinualMetrics,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    forgetting,
    forward_transfer,
)
from ondevice.continual.regularizers import LwF, OnlineEWC
from ondevice.continual.scenarios import ContinualResult, Scenario, load_scenario, run_scenario

__all__ = [
    "ADWIN",
    "RECIPES",
    "STRATEGIES",
    "BoostLR",
    "BufferConfig",
    "ClassBalancedBuffer",
    "ContinualMetrics",
    "ContinualResult",
    "DriftDetector",
    "DriftEvent",
    "LatentSplit",
    "Learner",
    "LearnerConfig",
    "LogDrift",
    "LwF",
    "ObserveResult",
    "OnlineEWC",
    "PageHinkley",
    "ReplayBuffer",
    "ReplayDraw",
    "ReservoirBuffer",
    "SampleCodec",
    "Scenario",
    "SnapshotOnDrift",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "create_learner",
    "find_boundary",
    "forgetting",
    "forward_transfer",
    "load_scenario",
    "run_scenario",
]
