"""Replay buffers: policies, byte budgets, 8-bit storage, state round trips."""

from __future__ import annotations

import pytest
import torch

from ondevice.continual import ClassBalancedBuffer, ReservoirBuffer, SampleCodec
from ondevice.continual.buffer import buffer_from_config
from ondevice.errors import CheckpointMismatchError, ConfigError


def _batch(n: int, start: int = 0, shape: tuple[int, ...] = (1, 8, 8), label: int | None = None) -> tuple:
    x = torch.arange(start, start + n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, *shape).clone()
    y = torch.full((n,), label) if label is not None else torch.arange(start, start + n) % 10
    return x, y


def test_reservoir_keeps_every_sample_with_equal_probability() -> None:
    # Algorithm R: after N samples each is kept with probability capacity / N.
    n, capacity, trials = 50, 10, 200
    kept = torch.zeros(n)
    for seed in range(trials):
        buffer = ReservoirBuffer(capacity, seed=seed)
        for i in range(n):
            buffer.add(*_batch(1, i))
        x, _ = buffer.contents()
        kept[x[:, 0, 0, 0].long()] += 1
    assert len(buffer) == capacity and buffer.seen == n
    rate = kept / trials
    assert rate.mean() == pytest.approx(capacity / n)
    assert float((rate - capacity / n).abs().max()) < 0.14  # 5 standard deviations (sd 0.028)


def test_class_balanced_buffer_balances_an_imbalanced_stream() -> None:
    buffer = ClassBalancedBuffer(40, seed=0)
    buffer.add(*_batch(400, label=0))  # a long run of one class first
    for label in (1, 2, 3):
        buffer.add(*_batch(30, label=label))
    counts = buffer.class_counts()
    assert sum(counts.values()) == 40
    assert max(counts.values()) - min(counts.values()) <= 1
    reservoir = ReservoirBuffer(40, seed=0)
    reservoir.add(*_batch(400, label=0))
    for label in (1, 2, 3):
        reservoir.add(*_batch(30, label=label))
    assert reservoir.class_counts()[0] > 25  # reservoir mirrors the imbalance


@pytest.mark.parametrize(("bits", "per_sample"), [(32, 64 * 4 + 2), (8, 64 + 2 * 4 + 2)])
def test_byte_budget_sets_the_capacity(bits: int, per_sample: int) -> None:
    buffer = ReservoirBuffer(capacity_bytes=10_000, bits=bits)
    assert buffer.capacity is None and buffer.buffer_bytes == 0
    buffer.add(*_batch(5))
    assert buffer.bytes_per_sample() == per_sample
    assert buffer.capacity == 10_000 // per_sample
    assert buffer.buffer_bytes == buffer.capacity * per_sample <= 10_000


def test_latent_vectors_take_a_quarter_of_the_bytes_in_8_bits() -> None:
    codec8, codec32 = SampleCodec(8), SampleCodec(32)
    assert codec8.bytes_per_sample((128,)) == 128 + 8
    assert codec32.bytes_per_sample((128,)) == 512
    assert codec8.bytes_per_sample((32, 4, 4)) == 512 + 32 * 8  # per-channel scales


@pytest.mark.parametrize("shape", [(16, 4, 4), (128,), (3, 64)])
def test_8_bit_codec_error_is_within_half_a_step(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.relu(torch.randn(6, *shape)) * 3
    codec = SampleCodec(8)
    values, params = codec.encode(x)
    assert values.dtype == torch.uint8
    restored = codec.decode(values, params)
    step = params[:, 1].max()
    assert float((restored - x).abs().max()) <= float(step) / 2 + 1e-6
    constant = torch.ones(2, *shape)
    assert torch.equal(codec.decode(*codec.encode(constant)), constant)


def test_state_round_trip_continues_identically() -> None:
    buffer = ClassBalancedBuffer(30, bits=8, seed=3)
    buffer.add(*_batch(50))
    clone = buffer_from_config(buffer.config.to_dict())
    clone.load_state(buffer.state_tensors(), buffer.state_metadata())
    assert torch.equal(clone.contents()[0], buffer.contents()[0])
    for b in (buffer, clone):
        b.add(*_batch(20, 100))
    assert torch.equal(clone.contents()[1], buffer.contents()[1])
    assert torch.equal(clone.sample(7)[0], buffer.sample(7)[0])


def test_load_state_rejects_other_settings() -> None:
    buffer = ReservoirBuffer(30)
    buffer.add(*_batch(5))
    with pytest.raises(CheckpointMismatchError, match="same buffer"):
        ReservoirBuffer(31).load_state(buffer.state_tensors(), buffer.state_metadata())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one"),
        ({"capacity": 10, "capacity_bytes": 100}, "exactly one"),
        ({"capacity": 0}, "positive"),
        ({"capacity": 10, "bits": 16}, "bits"),
    ],
)
def test_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ReservoirBuffer(**kwargs)


def test_too_small_a_budget_and_shape_changes_are_rejected() -> None:
    with pytest.raises(ConfigError, match="cannot hold one sample"):
        ReservoirBuffer(capacity_bytes=100).add(*_batch(1))
    buffer = ReservoirBuffer(10)
    buffer.add(*_batch(1))
    with pytest.raises(ConfigError, match="shape"):
        buffer.add(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ConfigError, match="empty"):
        ReservoirBuffer(10).sample(4)


def test_a_buffer_with_logits_stores_them_widens_and_round_trips() -> None:
    buffer = ReservoirBuffer(6, seed=0, logits=True)
    x, y = _batch(4)
    with pytest.raises(ConfigError, match="logits"):
        buffer.add(x, y)
    buffer.add(x, y, torch.arange(8, dtype=torch.float32).reshape(4, 2))
    assert buffer.logit_width == 2 and buffer.bytes_per_sample() == 64 * 4 + 2 + 2 * 4 + 2
    buffer.add(*_batch(2, 4), torch.ones(2, 3))  # the head grew to 3
    assert buffer.logit_width == 3
    draw = buffer.draw(6)
    assert draw.logits is not None and draw.logit_mask is not None
    by_value = {
        int(v): (lg.tolist(), m.tolist())
        for v, lg, m in zip(draw.x[:, 0, 0, 0], draw.logits, draw.logit_mask, strict=True)
    }
    assert by_value[1] == ([2.0, 3.0, 0.0], [True, True, False])
    assert by_value[5] == ([1.0, 1.0, 1.0], [True, True, True])
    assert buffer.buffer_bytes == 6 * (64 * 4 + 2 + 3 * 4 + 2)
    copy = buffer_from_config(buffer.config.to_dict())
    copy.load_state(buffer.state_tensors(), buffer.state_metadata())
    torch.testing.assert_close(copy.contents()[0], buffer.contents()[0])
    again = copy.draw(6)
    buffer.generator.manual_seed(1)
    copy.generator.manual_seed(1)
    a, b = buffer.draw(6), copy.draw(6)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.logit_mask, b.logit_mask)  # type: ignore[arg-type]
    assert again.logits is not None
    with pytest.raises(ConfigError, match="no logits"):
        ReservoirBuffer(4).add(x, y, torch.zeros(4, 2))
