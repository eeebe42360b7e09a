"""Transfer, class-incremental and domain-incremental splits of a :class:`TensorData`.

Every split is stratified and reproducible: the train/test assignment of each class is drawn from its
own generator seeded by ``(seed, class)``, so the same sample lands on the same side in every split made
with the same seed (``pretrain`` on classes 0-4 never sees a sample that ``transfer_split`` puts in a
test set, whatever image size either uses).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ondevice.data.tensordata import TensorData
from ondevice.errors import ConfigError

__all__ = [
    "DEFAULT_DOMAIN_SHIFTS",
    "Experience",
    "ShiftKind",
    "TransferSplit",
    "class_incremental",
    "domain_incremental",
    "domain_shift",
    "stratified_split",
    "transfer_split",
]

ShiftKind = Literal["rotation", "noise", "contrast"]
_SHIFT_KINDS = ("contrast", "noise", "rotation")

#: Default domains of :func:`domain_incremental`: clean, rotated 30 degrees, gaussian noise (std 0.8,
#: in normalised units), contrast reduced to 40 %.
DEFAULT_DOMAIN_SHIFTS: tuple[tuple[ShiftKind, float] | None, ...] = (
    None,
    ("rotation", 30.0),
    ("noise", 0.8),
    ("contrast", 0.4),
)


@dataclass(frozen=True, eq=False)
class TransferSplit:
    """Source and target sides of a transfer-learning split, each with a train and test part."""

    source_train: TensorData
    source_test: TensorData
    target_train: TensorData
    target_test: TensorData
    source_classes: tuple[int, ...]
    target_classes: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Experience:
    """One step of a continual-learning stream: its ``classes`` (global labels) and train/test data.

    ``shift`` names the domain shift applied (``None`` for clean data or class-incremental steps).
    """

    index: int
    classes: tuple[int, ...]
    train: TensorData
    test: TensorData
    shift: tuple[ShiftKind, float] | None = None


def _check_fraction(test_fraction: float) -> float:
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, int | float)
        or not 0 < test_fraction < 1
    ):
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    return float(test_fraction)


def _class_generator(seed: int, cls: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(cls)) % (2**63))


def stratified_split(
    y: torch.Tensor, *, test_fraction: float = 0.25, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, test)`` (each sorted) putting ``round(test_fraction * n_c)`` samples of every
    class ``c`` in the test part (at least one, and at least one left for training, when ``n_c >= 2``)."""
    test_fraction = _check_fraction(test_fraction)
    train_parts: list[torch.Tensor] = []
    test_parts: list[torch.Tensor] = []
    for cls in torch.unique(y).tolist():
        idx = (y == cls).nonzero().flatten()
        perm = idx[torch.randperm(idx.numel(), generator=_class_generator(seed, cls))]
        n_test = round(test_fraction * idx.numel())
        if idx.numel() >= 2:
            n_test = min(max(n_test, 1), idx.numel() - 1)
        test_parts.append(perm[:n_test])
        train_parts.append(perm[n_test:])
    empty = torch.empty(0, dtype=torch.int64)
    train = torch.sort(torch.cat(train_parts)).values if train_parts else empty
    test = torch.sort(torch.cat(test_parts)).values if test_parts else empty
    return train, test


def _check_classes(field: str, classes: Sequence[int], present: Sequence[int]) -> tuple[int, ...]:
    if isinstance(classes, str) or not isinstance(classes, Sequence) or len(classes) == 0:
        raise ConfigError(f"{field} must be a non-empty sequence of labels, got {classes!r}")
    out = tuple(int(c) for c in classes)
    if len(set(out)) != len(out):
        raise ConfigError(f"{field} lists a class twice: {out}")
    missing = sorted(set(out) - set(present))
    if missing:
        raise ConfigError(
            f"{field} names class(es) {missing} that the data does not have; it has {list(present)}"
        )
    return out


def _select(data: TensorData, classes: Sequence[int]) -> TensorData:
    return data.subset(torch.isin(data.y, torch.as_tensor(list(classes), dtype=torch.int64)))


def transfer_split(
    data: TensorData,
    *,
    source_classes: Sequence[int] = (0, 1, 2, 3, 4),
    target_classes: Sequence[int] = (5, 6, 7, 8, 9),
    test_fraction: float = 0.25,
    seed: int = 0,
    relabel: bool = True,
) -> TransferSplit:
    """Split ``data`` into a source task (pretraining) and a disjoint target task (adaptation).

    Each side is split into train/test with :func:`stratified_split`. With ``relabel``, each side's labels
    are mapped to ``0..k-1`` in the order the classes are given (``target_classes=(5, 6, ...)`` maps 5 to
    0); otherwise labels stay global.
    """
    present = data.classes
    src = _check_classes("source_classes", source_classes, present)
    tgt = _check_classes("target_classes", target_classes, present)
    overlap = sorted(set(src) & set(tgt))
    if overlap:
        raise ConfigError(f"source_classes and target_classes must be disjoint; both contain {overlap}")
    train_idx, test_idx = stratified_split(data.y, test_fraction=test_fraction, seed=seed)
    train, test = data.subset(train_idx), data.subset(test_idx)
    parts = []
    for classes in (src, tgt):
        for side in (train, test):
            part = _select(side, classes)
            if relabel:
                part = part.map_labels({c: i for i, c in enumerate(classes)})
            parts.append(part)
    return TransferSplit(parts[0], parts[1], parts[2], parts[3], src, tgt)


def class_incremental(
    data: TensorData,
    *,
    n_experiences: int = 5,
    class_order: Sequence[int] | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> list[Experience]:
    """Split ``data`` into ``n_experiences`` steps with disjoint class groups (labels stay global).

    Classes are taken in ``class_order`` (default: sorted) and dealt into consecutive groups as evenly as
    possible (sizes differ by at most one). Each step's train/test parts come from one stratified split of
    the whole data, so the test sets of all steps together are a stratified test set.
    """
    present = data.classes
    order = present if class_order is None else _check_classes("class_order", class_order, present)
    if (
        isinstance(n_experiences, bool)
        or not isinstance(n_experiences, int)
        or not 1 <= n_experiences <= len(order)
    ):
        raise ConfigError(
            f"n_experiences must be an int between 1 and the number of classes ({len(order)}), "
            f"got {n_experiences!r}"
        )
    train_idx, test_idx = stratified_split(data.y, test_fraction=test_fraction, seed=seed)
    train, test = data.subset(train_idx), data.subset(test_idx)
    groups = np.array_split(np.asarray(order), n_experiences)
    return [
        Experience(i, tuple(int(c) for c in g), _select(train, g.tolist()), _select(test, g.tolist()))
        for i, g in enumerate(groups)
    ]


def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    if x.dim() != 4:
        raise ConfigError(
            f"rotation needs images of shape (N, C, H, W), got {tuple(x.shape)}; load the data with "
            f"layout='image'"
        )
    if degrees % 360 == 0:
        return x.clone()
    rad = math.radians(degrees)
    cos, sin = math.cos(rad), math.sin(rad)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Rotate around the background value so that pixels coming in from outside look like background.
    fill = x.amin()
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def domain_shift(data: TensorData, kind: ShiftKind, severity: float, *, seed: int = 0) -> TensorData:
    """A copy of ``data`` under a domain shift (labels unchanged).

    - ``"rotation"``: rotate every image by ``severity`` degrees (counter-clockwise as displayed with row
      0 at the top) about its centre with bilinear ``affine_grid``/``grid_sample``; pixels entering from
      outside take the background (minimum) value. Images only.
    - ``"noise"``: add gaussian noise of standard deviation ``severity`` (drawn from a generator seeded
      with ``seed``).
    - ``"contrast"``: scale every sample's deviation from its own mean by the factor ``severity``
      (``< 1`` lowers contrast); the per-sample standard deviation is multiplied by ``severity``.
    """
    if isinstance(severity, bool) or not isinstance(severity, int | float) or not math.isfinite(severity):
        raise ConfigError(f"severity must be a finite number, got {severity!r}")
    x = data.x
    if kind == "rotation":
        out = _rotate(x, float(severity))
    elif kind == "noise":
        if severity < 0:
            raise ConfigError(f"noise severity is a standard deviation and must be >= 0, got {severity}")
        gen = torch.Generator().manual_seed(int(seed))
        out = x + float(severity) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    elif kind == "contrast":
        if severity < 0:
            raise ConfigError(f"contrast severity is a factor and must be >= 0, got {severity}")
        mean = x.flatten(1).mean(dim=1).reshape(-1, *([1] * (x.dim() - 1)))
        out = mean + float(severity) * (x - mean)
    else:
        raise ConfigError(f"unknown domain shift kind {kind!r}; valid kinds are: {', '.join(_SHIFT_KINDS)}")
    return TensorData(out.contiguous(), data.y.clone())


def domain_incremental(
    data: TensorData,
    shifts: Sequence[tuple[ShiftKind, float] | None] | None = None,
    *,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> list[Experience]:
    """One experience per domain: the same stratified train/test split, each under its own shift.

    ``shifts`` defaults to :data:`DEFAULT_DOMAIN_SHIFTS` (clean, rotation, noise, contrast); ``None`` in
    the list means clean data. Like Rotated-MNIST, every experience holds all classes and all samples;
    noise for experience ``i`` is drawn with seed ``seed + i``.
    """
    shifts = DEFAULT_DOMAIN_SHIFTS if shifts is None else tuple(shifts)
    if not shifts:
        raise ConfigError("shifts must list at least one (kind, severity) pair or None for clean data")
    train_idx, test_idx = stratified_split(data.y, test_fraction=test_fraction, seed=seed)
    train, test = data.subset(train_idx), data.subset(test_idx)
    experiences = []
    for i, shift in enumerate(shifts):
        if shift is None:
            tr, te = train, test
        else:
            if not isinstance(shift, tuple | list) or len(shift) != 2:
                raise ConfigError(f"shifts[{i}] must be (kind, severity) or None, got {shift!r}")
            kind, severity = shift
            tr = domain_shift(train, kind, severity, seed=seed + i)
            te = domain_shift(test, kind, severity, seed=seed + i + 10_007)
            shift = (kind, float(severity))
        experiences.append(Experience(i, data.classes, tr, te, shift))
    return experiences
