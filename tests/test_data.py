"""Tests of ondevice.data: the digits, TensorData, splits, domain shifts and streams."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ondevice.data import (
    DEFAULT_DOMAIN_SHIFTS,
    IterableStream,
    Stream,
    TensorData,
    as_stream,
    class_incremental,
    domain_incremental,
    domain_shift,
    load_digits,
    load_table,
    stratified_split,
    transfer_split,
)
from ondevice.errors import ConfigError


def _indexed(n: int = 200, n_classes: int = 10) -> TensorData:
    """Synthetic data whose input is the sample's own index, so splits can be checked for identity."""
    return TensorData(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n) % n_classes)


def _ids(data: TensorData) -> set[int]:
    return {int(v) for v in data.x[:, 0]}


# ---------------------------------------------------------------------------------------------- digits


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({}, (1, 8, 8)),
        ({"image_size": 16}, (1, 16, 16)),
        ({"image_size": 32, "channels": 3}, (3, 32, 32)),
        ({"image_size": (12, 20)}, (1, 12, 20)),
        ({"layout": "sequence"}, (1, 64)),
        ({"layout": "sequence", "length": 128, "channels": 3}, (3, 128)),
        ({"layout": "sequence", "image_size": 4}, (1, 16)),
    ],
)
def test_load_digits_shapes(kwargs: dict, shape: tuple[int, ...]) -> None:
    data = load_digits(**kwargs)
    assert len(data) == 1797 and data.shape == shape
    assert data.x.dtype == torch.float32 and data.y.dtype == torch.int64
    assert data.classes == tuple(range(10))


def test_load_digits_values() -> None:
    from sklearn.datasets import load_digits as sk_load_digits

    from ondevice.data.digits import _digits_file

    assert _digits_file() is not None  # read directly, without importing scikit-learn
    raw = load_digits(normalize=False)
    bunch = sk_load_digits()
    expected = torch.as_tensor(bunch.images, dtype=torch.float32) / 16
    assert torch.equal(raw.x[:, 0], expected)
    assert torch.equal(raw.y, torch.as_tensor(bunch.target, dtype=torch.int64))
    assert raw.x.min() == 0 and raw.x.max() == 1
    norm = load_digits()
    assert abs(float(norm.x.mean())) < 1e-3 and abs(float(norm.x.std()) - 1) < 1e-3
    rgb = load_digits(channels=3)
    assert torch.equal(rgb.x[:, 0], rgb.x[:, 2]) and torch.equal(rgb.x[:, :1], norm.x)
    seq = load_digits(layout="sequence")
    assert torch.equal(seq.x[:, 0], norm.x[:, 0].flatten(1))  # row-major scan
    assert torch.equal(seq.x[5, 0, 8:16], norm.x[5, 0, 1])  # the second row follows the first
    resampled = load_digits(layout="sequence", length=127)
    torch.testing.assert_close(resampled.x[:, 0, ::2], seq.x[:, 0], rtol=0, atol=1e-5)  # endpoints kept


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"image_size": 0}, "image_size"),
        ({"channels": 0}, "channels"),
        ({"layout": "video"}, "layout"),
        ({"length": 10}, "length"),
        ({"layout": "sequence", "length": -3}, "length"),
    ],
)
def test_load_digits_rejects(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_digits(**kwargs)


# ------------------------------------------------------------------------------------------ TensorData


def test_tensordata_indexing() -> None:
    data = _indexed(20)
    x, y = data[3]
    assert float(x[0]) == 3 and int(y) == 3
    assert isinstance(data[torch.tensor([1, 2])], TensorData) and _ids(data[torch.tensor([1, 2])]) == {1, 2}
    assert _ids(data[2:5]) == {2, 3, 4} and _ids(data.subset([0, 19])) == {0, 19}
    assert _ids(data.subset(data.y == 1)) == {1, 11}
    assert data.classes == tuple(range(10)) and len(data) == 20
    with pytest.raises(IndexError):
        data[20]
    mapped = data.map_labels({c: 9 - c for c in range(10)})
    assert torch.equal(mapped.y, 9 - data.y)
    with pytest.raises(ConfigError, match=r"no entry for label\(s\) \[9\]"):
        data.map_labels({c: c for c in range(9)})


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (torch.zeros(3, 2), torch.zeros(4, dtype=torch.int64), "same length"),
        (torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), "float32"),
        (torch.zeros(3, 2), torch.zeros(3, dtype=torch.int32), "int64"),
        (torch.zeros(3, 2), torch.zeros(3, 1, dtype=torch.int64), "1-D"),
        (np.zeros((3, 2), dtype=np.float32), torch.zeros(3, dtype=torch.int64), "tensors"),
    ],
)
def test_tensordata_validates(x: object, y: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TensorData(x, y)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("seed", [0, 1])
def test_stratified_split(seed: int) -> None:
    data = load_digits()
    train, test = stratified_split(data.y, test_fraction=0.25, seed=seed)
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(len(data)))
    for c in range(10):
        n_c = int((data.y == c).sum())
        assert int((data.y[test] == c).sum()) == round(0.25 * n_c)
    again, _ = stratified_split(data.y, test_fraction=0.25, seed=seed)
    assert torch.equal(train, again)


def test_transfer_split() -> None:
    data = _indexed(400)
    split = transfer_split(data, source_classes=(0, 1, 2, 3, 4), target_classes=(9, 5, 6, 7, 8))
    parts = [split.source_train, split.source_test, split.target_train, split.target_test]
    ids = [_ids(p) for p in parts]
    assert sum(len(i) for i in ids) == 400 and len(set().union(*ids)) == 400  # disjoint, complete
    for part in parts:
        assert part.classes == (0, 1, 2, 3, 4)  # relabelled to 0..k-1
    assert len(split.source_test) == 5 * 10 and len(split.target_test) == 5 * 10  # 25 % of 40 per class
    # order of target_classes decides the new labels: 9 -> 0, 5 -> 1
    nine = split.target_train.subset(split.target_train.x[:, 0] % 10 == 9)
    assert set(nine.y.tolist()) == {0}
    raw = transfer_split(data, relabel=False)
    assert raw.target_train.classes == (5, 6, 7, 8, 9)
    # the source test set does not depend on which target classes are chosen
    other = transfer_split(data, target_classes=(5,))
    assert _ids(other.source_test) == _ids(split.source_test)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source_classes": (0, 1), "target_classes": (1, 2)}, "disjoint"),
        ({"source_classes": (0, 11)}, "does not have"),
        ({"source_classes": ()}, "non-empty"),
        ({"test_fraction": 1.0}, "test_fraction"),
    ],
)
def test_transfer_split_rejects(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        transfer_split(_indexed(), **kwargs)


@pytest.mark.parametrize(
    ("n_experiences", "class_order", "groups"),
    [
        (5, None, [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]),
        (3, None, [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]),
        (2, (9, 8, 7, 6, 5, 4, 3, 2, 1, 0), [(9, 8, 7, 6, 5), (4, 3, 2, 1, 0)]),
        (10, None, [(c,) for c in range(10)]),
    ],
)
def test_class_incremental(n_experiences: int, class_order: tuple | None, groups: list) -> None:
    data = _indexed(400)
    exps = class_incremental(data, n_experiences=n_experiences, class_order=class_order)
    assert [e.index for e in exps] == list(range(n_experiences))
    assert [e.classes for e in exps] == groups
    seen: set[int] = set()
    for exp in exps:
        assert exp.train.classes == tuple(sorted(exp.classes))  # labels stay global
        assert exp.test.classes == tuple(sorted(exp.classes))
        ids = _ids(exp.train) | _ids(exp.test)
        assert not ids & seen and not _ids(exp.train) & _ids(exp.test)
        seen |= ids
    assert seen == set(range(400))


def test_class_incremental_rejects() -> None:
    with pytest.raises(ConfigError, match="n_experiences"):
        class_incremental(_indexed(), n_experiences=11)
    with pytest.raises(ConfigError, match="twice"):
        class_incremental(_indexed(), class_order=(0, 0, 1))


# ------------------------------------------------------------------------------------------ domain shift


def test_rotation() -> None:
    data = load_digits(image_size=16)
    assert torch.equal(domain_shift(data, "rotation", 0).x, data.x)
    assert torch.equal(domain_shift(data, "rotation", 360).x, data.x)
    quarter = domain_shift(data, "rotation", 90).x
    torch.testing.assert_close(quarter, torch.rot90(data.x, 1, (2, 3)), rtol=0, atol=1e-4)
    half = domain_shift(data, "rotation", 180).x
    torch.testing.assert_close(half, torch.flip(data.x, (2, 3)), rtol=0, atol=1e-4)
    small = domain_shift(data, "rotation", 15).x
    assert not torch.allclose(small, data.x)
    assert float(small.min()) >= float(data.x.min()) - 1e-5  # background fill, no new dark values
    assert torch.equal(domain_shift(data, "rotation", 15).y, data.y)
    with pytest.raises(ConfigError, match="layout='image'"):
        domain_shift(load_digits(layout="sequence"), "rotation", 10)


@pytest.mark.parametrize("std", [0.1, 0.5, 1.0])
def test_noise_std_is_measured(std: float) -> None:
    data = load_digits()
    noisy = domain_shift(data, "noise", std, seed=3)
    measured = float((noisy.x - data.x).std())
    assert abs(measured - std) < 0.01 * std + 1e-3
    assert torch.equal(noisy.x, domain_shift(data, "noise", std, seed=3).x)
    assert not torch.equal(noisy.x, domain_shift(data, "noise", std, seed=4).x)


@pytest.mark.parametrize("factor", [0.25, 0.5, 2.0])
def test_contrast_factor_is_measured(factor: float) -> None:
    data = load_digits()
    shifted = domain_shift(data, "contrast", factor)
    ratio = shifted.x.flatten(1).std(dim=1) / data.x.flatten(1).std(dim=1)
    torch.testing.assert_close(ratio, torch.full_like(ratio, factor), rtol=1e-4, atol=0)
    torch.testing.assert_close(shifted.x.flatten(1).mean(1), data.x.flatten(1).mean(1), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "severity", "match"),
    [("blur", 1.0, "rotation"), ("noise", -1.0, ">= 0"), ("contrast", float("nan"), "finite")],
)
def test_domain_shift_rejects(kind: str, severity: float, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        domain_shift(load_digits(), kind, severity)  # type: ignore[arg-type]


def test_domain_incremental_default() -> None:
    data = load_digits()
    exps = domain_incremental(data)
    assert len(exps) == 4 and [e.shift for e in exps] == list(DEFAULT_DOMAIN_SHIFTS)
    clean = exps[0]
    train_idx, test_idx = stratified_split(data.y, seed=0)
    assert torch.equal(clean.train.x, data.x[train_idx]) and torch.equal(clean.test.y, data.y[test_idx])
    for exp in exps:
        assert exp.classes == tuple(range(10))
        assert torch.equal(exp.train.y, clean.train.y) and torch.equal(exp.test.y, clean.test.y)
    assert not any(torch.allclose(e.train.x, clean.train.x) for e in exps[1:])
    custom = domain_incremental(data, [("noise", 0.2), ("contrast", 0.5)])
    assert [e.shift for e in custom] == [("noise", 0.2), ("contrast", 0.5)]


# --------------------------------------------------------------------------------------------- streams


@pytest.mark.parametrize(
    ("batch_size", "drop_last", "sizes"), [(1, False, [1] * 10), (4, False, [4, 4, 2]), (4, True, [4, 4])]
)
def test_stream_in_order(batch_size: int, drop_last: bool, sizes: list[int]) -> None:
    data = _indexed(10)
    stream = Stream(data, batch_size=batch_size, drop_last=drop_last)
    batches = list(stream)
    assert [b[0].shape[0] for b in batches] == sizes and len(stream) == len(sizes)
    ids = [int(v) for x, _ in batches for v in x[:, 0]]
    assert ids == list(range(sum(sizes)))
    assert batches[0][0].shape[1:] == (1,) and batches[0][1].dtype == torch.int64
    assert [int(v) for x, _ in stream for v in x[:, 0]] == ids  # re-iterable


def test_stream_shuffle_is_a_permutation_per_epoch() -> None:
    data = _indexed(50)
    stream = Stream(data, batch_size=8, shuffle=True, seed=1, epochs=3)
    ids = [int(v) for x, _ in stream for v in x[:, 0]]
    assert len(stream) == 3 * 7
    epochs = [ids[i * 50 : (i + 1) * 50] for i in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(50))
        assert epoch != list(range(50))
    assert epochs[0] != epochs[1]
    assert ids == [int(v) for x, _ in stream for v in x[:, 0]]  # same seed, same sequence
    other = Stream(data, batch_size=8, shuffle=True, seed=2)
    assert [int(v) for x, _ in other for v in x[:, 0]] != epochs[0]


def test_stream_labels_follow_inputs() -> None:
    data = _indexed(30)
    for x, y in Stream(data, batch_size=7, shuffle=True, seed=0):
        assert torch.equal(y, x[:, 0].long() % 10)


class _PairDataset(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return np.full((2,), i, dtype=np.float64), i % 3


def _collect(stream: object) -> tuple[list[int], list[int]]:
    ids, sizes = [], []
    for x, y in stream:  # type: ignore[attr-defined]
        assert (
            x.dtype == torch.float32 and y.dtype == torch.int64 and y.dim() == 1 and x.shape[0] == y.shape[0]
        )
        ids += [int(v) for v in x.reshape(x.shape[0], -1)[:, 0]]
        sizes.append(int(y.shape[0]))
    return ids, sizes


x10 = torch.arange(10, dtype=torch.float32).unsqueeze(1)
y10 = torch.arange(10) % 3


@pytest.mark.parametrize(
    ("make", "kwargs", "kind", "sizes"),
    [
        (lambda: TensorData(x10, y10), {}, Stream, [1] * 10),
        (lambda: TensorData(x10, y10), {"batch_size": 4}, Stream, [4, 4, 2]),
        (lambda: (x10, y10), {"batch_size": 5}, Stream, [5, 5]),
        (lambda: (x10.numpy().astype(np.float64), y10.numpy()), {}, Stream, [1] * 10),
        (lambda: (torch.tensor([7.0]), torch.tensor(1)), {}, Stream, [1]),
        (lambda: TensorDataset(x10, y10), {}, IterableStream, [1] * 10),
        (lambda: TensorDataset(x10, y10), {"batch_size": 3}, IterableStream, [3, 3, 3, 1]),
        (lambda: _PairDataset(10), {"batch_size": 4}, IterableStream, [4, 4, 2]),
        (lambda: DataLoader(TensorDataset(x10, y10), batch_size=4), {}, IterableStream, [4, 4, 2]),
        (
            lambda: DataLoader(TensorDataset(x10, y10), batch_size=4),
            {"batch_size": 3},
            IterableStream,
            [3, 3, 3, 1],
        ),
        (lambda: [(x10[i], int(y10[i])) for i in range(10)], {}, IterableStream, [1] * 10),
        (lambda: [(x10[i : i + 5], y10[i : i + 5]) for i in (0, 5)], {}, IterableStream, [5, 5]),
        (lambda: ((x10[i], y10[i]) for i in range(10)), {"batch_size": 6}, IterableStream, [6, 4]),
    ],
)
def test_as_stream_accepts(make: Callable[[], object], kwargs: dict, kind: type, sizes: list[int]) -> None:
    stream = as_stream(make(), **kwargs)
    assert isinstance(stream, kind)
    ids, got_sizes = _collect(stream)
    assert got_sizes == sizes
    assert ids == (list(range(10)) if sum(sizes) == 10 else [7])


def test_as_stream_shuffles_datasets_and_passes_streams_through() -> None:
    ds = TensorDataset(x10, y10)
    ids, _ = _collect(as_stream(ds, shuffle=True, seed=0, epochs=2))
    assert (
        sorted(ids[:10]) == list(range(10)) and sorted(ids[10:]) == list(range(10)) and ids[:10] != ids[10:]
    )
    stream = Stream(TensorData(x10, y10))
    assert as_stream(stream) is stream
    assert as_stream(stream, batch_size=5).batch_size == 5
    assert len(as_stream(ds, batch_size=4)) == 3 and len(as_stream(DataLoader(ds, batch_size=4))) == 3


@pytest.mark.parametrize(
    "obj",
    ["digits.csv", b"raw", {"x": x10, "y": y10}, x10, x10.numpy(), None, 42, 3.5, object()],
)
def test_as_stream_rejects(obj: object) -> None:
    with pytest.raises(ConfigError, match=rf"cannot stream a {type(obj).__name__}; it accepts a TensorData"):
        as_stream(obj)


def test_as_stream_rejects_bad_items_and_options() -> None:
    with pytest.raises(ConfigError, match=r"\(x, y\) pair, got tuple of length 3"):
        list(as_stream([(x10[0], 1, 2)]))
    with pytest.raises(ConfigError, match="labels must be integers"):
        list(as_stream([(x10[0], 0.5)]))
    with pytest.raises(ConfigError, match="differ in length"):
        list(as_stream([(x10[:3], y10[:2])]))
    with pytest.raises(ConfigError, match="shuffle=True on the DataLoader"):
        as_stream(DataLoader(TensorDataset(x10, y10)), shuffle=True)
    with pytest.raises(ConfigError, match="re-iterable"):
        as_stream(iter([(x10[0], 0)]), epochs=2)
    with pytest.raises(ConfigError, match="batch_size"):
        as_stream(TensorData(x10, y10), batch_size=0)


def test_load_table_turns_unreadable_files_into_config_errors(tmp_path: Path) -> None:
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"cannot read .*folder\.csv.*IsADirectoryError"):
        load_table(folder)
    truncated = tmp_path / "cut.npy"
    np.save(truncated, np.zeros((4, 3), dtype=np.float32))
    truncated.write_bytes(truncated.read_bytes()[:-7])
    with pytest.raises(ConfigError, match=r"cut\.npy"):
        load_table(truncated)
