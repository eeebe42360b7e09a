from __future__ import annotations

import numpy as np
import pytest

from federated.partition import Partition, partition_indices
from ondevice.errors import ConfigError

LABELS = np.repeat(np.arange(10), 100)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.3", "dirichlet:100"])
@pytest.mark.parametrize("n", [1, 10, 100])
def test_partitions_are_disjoint_and_cover_everything(spec: str, n: int) -> None:
    parts = partition_indices(LABELS, n, spec, seed=1)
    assert len(parts) == n
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(LABELS.size))
    assert min(p.size for p in parts) >= 2


def test_partitions_are_reproducible() -> None:
    a = partition_indices(LABELS, 10, "dirichlet:0.3", seed=4)
    b = partition_indices(LABELS, 10, "dirichlet:0.3", seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_small_alpha_skews_labels() -> None:
    def dominant_share(spec: str) -> float:
        parts = partition_indices(LABELS, 10, spec, seed=0)
        return float(np.mean([np.bincount(LABELS[p], minlength=10).max() / p.size for p in parts]))

    assert dominant_share("dirichlet:0.3") > 2 * dominant_share("iid")


@pytest.mark.parametrize("spec", ["dirichlet", "dirichlet:-1", "iid:3", "zipf", "dirichlet:abc"])
def test_bad_specs(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"partition|alpha"):
        Partition.parse(spec)


def test_too_many_devices() -> None:
    with pytest.raises(ConfigError, match="fewer devices"):
        partition_indices(np.arange(10), 6, "iid")
