"""Drift detectors against known change points."""

from __future__ import annotations

import random

import pytest

from ondevice.continual import ADWIN, PageHinkley
from ondevice.continual.drift import detector_from_dict
from ondevice.errors import ConfigError


def _stream(
    seed: int, change_at: int, before: float, after: float, n: int, noise: float = 0.1
) -> list[float]:
    rng = random.Random(seed)
    return [(before if i < change_at else after) + rng.gauss(0, noise) for i in range(n)]


def _detections(detector: PageHinkley | ADWIN, values: list[float]) -> list[int]:
    return [i for i, v in enumerate(values) if detector.update(v)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_page_hinkley_detects_a_rise_soon_after_the_change(seed: int) -> None:
    values = _stream(seed, 500, 0.2, 1.0, 1000)
    hits = _detections(PageHinkley(delta=0.05, threshold=5.0), values)
    assert hits, "no drift detected"
    assert 500 <= hits[0] < 530
    assert all(h >= 500 for h in hits)


def test_page_hinkley_decrease_direction() -> None:
    values = _stream(0, 300, 0.9, 0.3, 600, noise=0.05)
    assert not _detections(PageHinkley(threshold=5.0), values)  # a fall is not a rise
    hits = _detections(PageHinkley(threshold=5.0, direction="decrease"), values)
    assert hits and 300 <= hits[0] < 330


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adwin_detects_the_change_and_shrinks_its_window(seed: int) -> None:
    values = _stream(seed, 1000, 0.2, 0.8, 2000)
    detector = ADWIN(delta=0.002)
    hits = _detections(detector, values)
    assert hits and 1000 <= hits[0] < 1100
    assert detector.width < 1100  # the pre-change values were dropped
    assert detector.estimate == pytest.approx(0.8, abs=0.05)


def test_adwin_is_quiet_on_a_stationary_stream() -> None:
    assert not _detections(ADWIN(), _stream(3, 10**9, 0.5, 0.5, 3000))
    assert not _detections(PageHinkley(delta=0.05, threshold=5.0), _stream(3, 10**9, 0.5, 0.5, 3000))


def test_adwin_memory_is_logarithmic() -> None:
    detector = ADWIN(max_buckets=5)
    for v in _stream(0, 10**9, 0.5, 0.5, 4096):
        detector.update(v)
    assert detector.width == 4096
    assert len(detector.buckets) <= 5 * 13


@pytest.mark.parametrize("cls", [PageHinkley, ADWIN])
def test_state_round_trips_through_json(cls: type) -> None:
    import json

    detector = cls()
    values = _stream(0, 200, 0.2, 0.9, 300)
    for v in values[:150]:
        detector.update(v)
    clone = detector_from_dict(json.loads(json.dumps(detector.to_dict())))
    assert [detector.update(v) for v in values[150:]] == [clone.update(v) for v in values[150:]]


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: PageHinkley(threshold=0), "threshold"),
        (lambda: PageHinkley(alpha=1.5), "alpha"),
        (lambda: PageHinkley(direction="up"), "direction"),
        (lambda: ADWIN(delta=2.0), "delta"),
        (lambda: ADWIN(clock=0), "clock"),
    ],
)
def test_bad_settings_are_rejected(factory: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        factory()  # type: ignore[operator]
