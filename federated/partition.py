"""Splitting the digits across devices: IID or label-skewed Dirichlet(alpha), reproducibly.

Dirichlet partitioning follows Hsu, Qi & Brown ("Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification", 2019): for each class, the shares of the devices are
drawn from ``Dir(alpha * 1)``; small ``alpha`` (0.3) gives each device a few dominant classes. Draws are
repeated (with the next seed) until every device holds at least ``min_samples`` samples.

The federation's data: the digits are split once, stratified, into a server test set (25 %) and a
training pool; the pool is partitioned across ``num_partitions`` devices; each device keeps 20 % of its
share as a local test set (for personalised accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ondevice.data import TensorData
from ondevice.data.splits import stratified_split
from ondevice.errors import ConfigError

__all__ = [
    "ClientData",
    "FederatedSplit",
    "Partition",
    "client_data",
    "federated_split",
    "partition_indices",
]

_MAX_DRAWS = 100


@dataclass(frozen=True)
class Partition:
    """How samples are spread over devices: ``iid`` or ``dirichlet`` with concentration ``alpha``."""

    kind: Literal["iid", "dirichlet"] = "iid"
    alpha: float = 0.3

    def __post_init__(self) -> None:
        if self.kind not in ("iid", "dirichlet"):
            raise ConfigError(f"partition kind must be 'iid' or 'dirichlet', got {self.kind!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise ConfigError(f"dirichlet alpha must be a positive number, got {self.alpha!r}")

    @staticmethod
    def parse(spec: Partition | str) -> Partition:
        """``"iid"`` or ``"dirichlet:ALPHA"`` (e.g. ``"dirichlet:0.3"``)."""
        if isinstance(spec, Partition):
            return spec
        if not isinstance(spec, str):
            raise ConfigError(f"partition must be 'iid' or 'dirichlet:ALPHA', got {spec!r}")
        kind, _, arg = spec.strip().partition(":")
        if kind == "iid" and not arg:
            return Partition("iid")
        if kind == "dirichlet" and arg:
            try:
                return Partition("dirichlet", float(arg))
            except ValueError:
                pass
        raise ConfigError(f"partition must be 'iid' or 'dirichlet:ALPHA' (e.g. dirichlet:0.3), got {spec!r}")

    def spec(self) -> str:
        """The string form :meth:`parse` reads back."""
        return "iid" if self.kind == "iid" else f"dirichlet:{self.alpha:g}"


def partition_indices(
    labels: Sequence[int] | np.ndarray,
    num_partitions: int,
    partition: Partition | str,
    *,
    seed: int = 0,
    min_samples: int = 2,
) -> list[np.ndarray]:
    """Indices of ``labels`` for each of ``num_partitions`` devices (disjoint, covering all, sorted).

    Raises:
        ConfigError: fewer samples than ``num_partitions * min_samples``, or no Dirichlet draw giving every
            device ``min_samples`` in 100 tries (raise alpha or lower the number of devices).
    """
    part = Partition.parse(partition)
    y = np.asarray(labels)
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        raise ConfigError(f"num_partitions must be a positive int, got {num_partitions!r}")
    if y.size < num_partitions * min_samples:
        raise ConfigError(
            f"{y.size} samples cannot give {num_partitions} devices {min_samples} samples each; use fewer "
            f"devices"
        )
    for draw in range(_MAX_DRAWS):
        rng = np.random.default_rng([seed, draw])
        if part.kind == "iid":
            order = rng.permutation(y.size)
            parts = np.array_split(order, num_partitions)
        else:
            buckets: list[list[int]] = [[] for _ in range(num_partitions)]
            for cls in np.unique(y):
                idx = rng.permutation(np.flatnonzero(y == cls))
                shares = rng.dirichlet(np.full(num_partitions, part.alpha))
                cuts = (np.cumsum(shares)[:-1] * idx.size).astype(int)
                for device, chunk in enumerate(np.split(idx, cuts)):
                    buckets[device].extend(chunk.tolist())
            parts = [np.asarray(b, dtype=np.int64) for b in buckets]
        if min(p.size for p in parts) >= min_samples:
            return [np.sort(p) for p in parts]
    raise ConfigError(
        f"no {part.spec()} draw gave all {num_partitions} devices {min_samples}+ samples in {_MAX_DRAWS} "
        f"tries; raise alpha or use fewer devices"
    )


@dataclass(frozen=True, eq=False)
class FederatedSplit:
    """The server's test set and the training pool that devices share."""

    pool: TensorData
    test: TensorData


@dataclass(frozen=True, eq=False)
class ClientData:
    """One device's data: what it trains on and its local test set."""

    train: TensorData
    test: TensorData


def federated_split(data: TensorData, *, test_fraction: float = 0.25, seed: int = 0) -> FederatedSplit:
    """Stratified split into the training pool and the server's test set (same on every machine)."""
    train_idx, test_idx = stratified_split(data.y, test_fraction=test_fraction, seed=seed)
    return FederatedSplit(pool=data.subset(train_idx), test=data.subset(test_idx))


def client_data(
    split: FederatedSplit,
    partition_id: int,
    num_partitions: int,
    partition: Partition | str,
    *,
    seed: int = 0,
    local_test_fraction: float = 0.2,
) -> ClientData:
    """Device ``partition_id``'s share of the pool, split into local train/test (1+ train sample)."""
    if (
        isinstance(partition_id, bool)
        or not isinstance(partition_id, int)
        or not (0 <= partition_id < num_partitions)
    ):
        raise ConfigError(f"partition_id must be in 0..{num_partitions - 1}, got {partition_id!r}")
    indices = partition_indices(split.pool.y.numpy(), num_partitions, partition, seed=seed)[partition_id]
    rng = np.random.default_rng([seed, partition_id, 7])
    shuffled = rng.permutation(indices)
    n_test = min(round(local_test_fraction * shuffled.size), shuffled.size - 1)
    test_idx, train_idx = np.sort(shuffled[:n_test]), np.sort(shuffled[n_test:])
    pool = split.pool
    test = pool.subset(torch.as_tensor(test_idx)) if n_test else pool.subset(torch.as_tensor(train_idx[:1]))
    return ClientData(train=pool.subset(torch.as_tensor(train_idx)), test=test)
