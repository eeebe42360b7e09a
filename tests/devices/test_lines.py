from __future__ import annotations

import logging
import threading
import time

import pytest
import serial
import torch

from devices.lines import LineError, Sample, SampleStream, parse_line, windows
from devices.ports import Backoff
from devices.testing.emulator import SensorEmulator, sensor_lines
from ondevice.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "label_column", "values", "label"),
    [
        ("1.5,-2,3e-3", None, (1.5, -2.0, 0.003), None),
        ("1.5\t-2\t3", None, (1.5, -2.0, 3.0), None),
        ("  1.5  -2 3\r\n", None, (1.5, -2.0, 3.0), None),
        ("1, 2, 3,", None, (1.0, 2.0, 3.0), None),
        ("wave,1,2", 0, (1.0, 2.0), "wave"),
        ("1,2,idle", -1, (1.0, 2.0), "idle"),
    ],
)
def test_parse_line(text, label_column, values, label) -> None:
    sample = parse_line(text, label_column=label_column)
    assert sample.values == values and sample.label == label


@pytest.mark.parametrize(
    ("text", "label_column", "reason"),
    [
        ("", None, "empty"),
        ("1,x,3", None, "non_numeric"),
        ("1,nan", None, "non_numeric"),
        ("1", 3, "column_count"),
    ],
)
def test_parse_line_errors(text, label_column, reason) -> None:
    with pytest.raises(LineError) as info:
        parse_line(text, label_column=label_column)
    assert info.value.reason == reason


def test_windower_shapes_hop_and_labels() -> None:
    samples = [Sample((float(i), float(-i)), "a" if i < 6 else "b") for i in range(10)]
    out = list(windows(samples, 4, 2))
    assert len(out) == 4  # windows end at samples 3, 5, 7, 9
    x, y0 = out[0]
    assert x.shape == (1, 2, 4) and x.dtype == torch.float32 and y0.shape == (1,) and y0.dtype == torch.int64
    assert torch.equal(x[0, 0], torch.tensor([0.0, 1, 2, 3])) and torch.equal(x[0, 1], -x[0, 0])
    assert [int(y) for _, y in out] == [0, 0, 1, 1]  # majority label, ties to the latest
    assert len(list(windows(samples, 3, 5))) == 2  # hop longer than the window skips samples
    assert [int(y) for _, y in windows(samples, 5, labels=["b", "a"])] == [1, 0]
    assert [int(y) for _, y in windows([Sample((1.0,))] * 4, 2)] == [-1, -1]


def check_rate_matches_timestamps(stream: SampleStream, got: list[Sample], rate_window: int = 200) -> None:
    """The rate estimate is lines per second over the last ``rate_window`` samples' own timestamps.

    Lines that arrive in one read share a timestamp; should every line of the window have come in one read,
    there is no rate to give yet.
    """
    recent = got[-rate_window:]
    span_s = recent[-1].t_s - recent[0].t_s
    if span_s > 0:
        assert stream.stats.sampling_rate_hz == pytest.approx((len(recent) - 1) / span_s)
    else:
        assert stream.stats.sampling_rate_hz is None


def make_stream(port, **kwargs) -> SampleStream:
    return SampleStream(port, backoff=Backoff(initial_s=0.01, max_s=0.1), **kwargs)


def check_round_trip(lines: list[str], samples: list[Sample], window: int) -> None:
    expected = [parse_line(line, label_column=-1) for line in lines]
    assert [(s.values, s.label) for s in samples] == [(e.values, e.label) for e in expected]  # values equal
    pairs = list(windows(samples, window, window // 2, labels=["idle", "wave"]))
    assert len(pairs) == (len(lines) - window) // (window // 2) + 1
    model = torch.nn.Sequential(
        torch.nn.Conv1d(3, 4, 5),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool1d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )
    x, _ = pairs[0]
    assert torch.allclose(x[0].T, torch.tensor([e.values for e in expected[:window]], dtype=torch.float32))
    loss = torch.nn.functional.cross_entropy(
        model(torch.cat([p[0] for p in pairs])), torch.cat([p[1] for p in pairs])
    )
    loss.backward()
    assert torch.isfinite(loss)


def test_loop_url_round_trip_with_garbage_and_partial_lines() -> None:
    port = serial.serial_for_url("loop://", timeout=0.02)
    lines = sensor_lines(256, label_column=-1, separator="\t")
    noise = [b"\xff\xfe\x80\n", b"1,2\n", b"not,a,number,x\n", b"\n", b"9" * 5000 + b"\n"]
    stream = make_stream(lambda: port, label_column=-1, resync=False)

    def feed() -> None:
        for i, line in enumerate(lines):
            data = (line + "\n").encode()
            port.write(data[:5])
            time.sleep(0.0005 if i % 50 == 0 else 0)  # a read timeout may split the line
            port.write(data[5:])
            if i % 64 == 10:
                port.write(noise[(i // 64) % len(noise)])

    writer = threading.Thread(target=feed)
    writer.start()
    got = list(stream.samples(max_samples=len(lines), duration_s=20))
    writer.join()
    stream.close()
    check_round_trip(lines, got, window=32)
    stats = stream.stats
    assert stats.samples == 256 and stats.channels == 3
    assert stats.dropped_total == 4 and stats.dropped["undecodable"] == 1
    assert stats.dropped["column_count"] == 1 and stats.dropped["non_numeric"] == 1
    assert stats.dropped["empty"] == 1
    check_rate_matches_timestamps(stream, got)


@pytest.mark.integration
def test_pty_round_trip(pty_pair) -> None:
    device, path = pty_pair
    lines = sensor_lines(200, label_column=-1)
    with make_stream(path, label_column=-1, resync=False) as stream:
        assert stream.port.ensure_open()
        with SensorEmulator(device, lines, rate_hz=2000, garbage_every=40, split_writes=True):
            got = list(stream.samples(max_samples=200, duration_s=20))
    check_round_trip(lines, got, window=50)
    # A garbage line follows every 40th reading; each one read is dropped exactly once (under which reason
    # depends on how the pty split it). The 5th follows the 200th reading, where the stream stops: it is
    # read only if it arrived in the same chunk.
    assert sum(stream.stats.dropped.values()) in (4, 5) and stream.stats.partial_reads > 0
    check_rate_matches_timestamps(stream, got)


def test_column_count_change_is_dropped_then_adopted() -> None:
    port = serial.serial_for_url("loop://", timeout=0.02)
    port.write(b"".join(b"1,2,3\n" for _ in range(5)) + b"".join(b"1,2\n" for _ in range(6)))
    with make_stream(lambda: port, adopt_after=4, resync=False) as stream:
        got = list(stream.samples(max_samples=7, duration_s=5))
    assert [len(s.values) for s in got] == [3] * 5 + [2, 2]
    assert stream.stats.dropped["column_count"] == 3 and stream.stats.channels == 2


class Flaky:
    """A port that serves scripted bytes, then fails like an unplugged USB adapter."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.closed = False

    def read(self, size: int = 1) -> bytes:
        if not self.data:
            raise serial.SerialException("device reports readiness to read but returned no data")
        chunk, self.data = self.data[:7], self.data[7:]
        return chunk

    def write(self, data: bytes) -> int:
        return len(data)

    def close(self) -> None:
        self.closed = True


def test_unplug_wrapper_reconnects_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    first = b"0,tail-of-a-line-cut-by-opening\n" + "".join(f"{i},{i}\n" for i in range(50)).encode()
    second = b"1,1,partial-line-cut-by-the-replug\n" + "".join(f"{i},{i}\n" for i in range(50, 80)).encode()
    ports = [Flaky(first), None, None, Flaky(second)]

    def opener() -> Flaky:
        port = ports.pop(0)
        if port is None:
            raise serial.SerialException("[Errno 2] could not open port /dev/ttyACM0")
        return port

    stream = SampleStream(opener, backoff=Backoff(initial_s=0.02, max_s=1))
    with caplog.at_level(logging.INFO, logger="devices.ports"):
        got = list(stream.samples(max_samples=80, duration_s=10))
    assert [s.values[0] for s in got] == [float(i) for i in range(80)]
    assert stream.stats.reconnects == 1 and stream.stats.dropped["resync"] == 2
    assert ports == [] and stream.port.failures == 1
    # The port says what it waits before each new attempt: the backoff's delays, growing exponentially
    # between the two failed attempts and starting over after the unplug.
    waits = [r.args[1] for r in caplog.records if r.msg.startswith("cannot open serial port")]  # type: ignore[index]
    assert waits == pytest.approx([0.02, 0.04])
    stream.close()


@pytest.mark.parametrize(
    ("backoff", "delays"),
    [
        (Backoff(initial_s=0.02, max_s=1, max_attempts=4), [0.02, 0.04, 0.08, 0.16]),
        (Backoff(initial_s=0.05, factor=3, max_s=0.5, max_attempts=5), [0.05, 0.15, 0.45, 0.5, 0.5]),
        (Backoff(initial_s=0.1, factor=1, max_s=0.1, max_attempts=3), [0.1, 0.1, 0.1]),
    ],
)
def test_backoff_delays_grow_by_the_factor_up_to_the_cap(backoff: Backoff, delays: list[float]) -> None:
    assert list(backoff.delays()) == pytest.approx(delays)
    endless = Backoff(initial_s=0.01, max_s=0.04).delays()
    assert [next(endless) for _ in range(6)] == pytest.approx([0.01, 0.02, 0.04, 0.04, 0.04, 0.04])


class Scripted:
    """A port that serves one chunk per read and moves a test clock to the time that chunk arrives."""

    def __init__(self, chunks: list[tuple[float, bytes]], clock: list[float]) -> None:
        self.chunks = list(chunks)
        self.clock = clock

    def read(self, size: int = 1) -> bytes:
        if not self.chunks:
            return b""
        self.clock[0], chunk = self.chunks.pop(0)
        return chunk

    def write(self, data: bytes) -> int:
        return len(data)

    def close(self) -> None:
        pass


def test_sampling_rate_is_inferred_from_the_arrival_times_over_the_rate_window() -> None:
    clock = [0.0]
    # 30 lines at 100 Hz, then 30 at 25 Hz; four lines arrive together at the end (one timestamp).
    times = [i * 0.01 for i in range(30)] + [0.29 + (i + 1) * 0.04 for i in range(30)]
    chunks = [(t, f"{i},{i}\n".encode()) for i, t in enumerate(times)]
    chunks.append((times[-1] + 0.10, b"".join(f"{60 + i},0\n".encode() for i in range(4))))
    stream = SampleStream(
        lambda: Scripted(chunks, clock), resync=False, rate_window=10, clock=lambda: clock[0]
    )
    rates = []
    for sample in stream.samples(max_samples=64):
        rates.append(stream.stats.sampling_rate_hz)
        assert sample.t_s == clock[0]
    assert rates[0] is None  # one line gives no rate
    assert rates[1] == pytest.approx(100.0) and rates[29] == pytest.approx(100.0)
    assert rates[59] == pytest.approx(25.0)  # the window holds only the slower lines by now
    # After the burst the window holds the last 6 slow lines and the 4 that came together, 0.10 s later.
    assert rates[63] == pytest.approx(9 / (5 * 0.04 + 0.10))
    stream.close()


def test_backoff_gives_up() -> None:
    def opener():
        raise serial.SerialException("no such port")

    stream = SampleStream(opener, backoff=Backoff(initial_s=0.01, max_s=0.02, max_attempts=3))
    assert list(stream.samples()) == [] and stream.port.gave_up


@pytest.mark.integration
def test_pty_unplug_and_replug(socket_path) -> None:
    device = socket_path.plug()
    stream = make_stream(str(socket_path.path), label_column=-1, resync=False)
    got: list[Sample] = []

    def consume() -> None:
        got.extend(stream.samples(max_samples=200, duration_s=20))

    assert stream.port.ensure_open()
    consumer = threading.Thread(target=consume)
    consumer.start()
    lines = sensor_lines(200, label_column=-1)
    with SensorEmulator(device, lines[:100]) as emulator:
        emulator.wait(5)
        deadline = time.monotonic() + 5
        while len(got) < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
    socket_path.unplug()
    time.sleep(0.3)  # unplugged for a while: the stream retries with backoff
    device = socket_path.plug()
    deadline = time.monotonic() + 10
    while stream.stats.reconnects < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    with SensorEmulator(device, lines[100:]) as emulator:
        emulator.wait(5)
        consumer.join(timeout=15)
    stream.close()
    assert len(got) == 200 and [s.values for s in got] == [
        parse_line(x, label_column=-1).values for x in lines
    ]
    assert stream.stats.reconnects == 1 and stream.port.failures >= 1


@pytest.mark.integration
def test_pty_reader_thread_keeps_reading_while_the_consumer_is_busy(pty_pair, caplog) -> None:
    """With a queue the port is read in a thread of its own: a consumer that is busy (learning) while the
    sensor sends everything loses only what overflows the queue, the oldest readings, each one counted."""
    device, path = pty_pair
    lines = sensor_lines(300, label_column=-1)
    stream = make_stream(path, label_column=-1, resync=False, queue_size=20)
    assert stream.port.ensure_open()
    stream.start()
    with caplog.at_level(logging.WARNING, logger="devices.lines"):
        with SensorEmulator(device, lines, rate_hz=5000) as emulator:  # the consumer takes nothing meanwhile
            emulator.wait(10)
        deadline = time.monotonic() + 10
        while stream.stats.lines < len(lines) and time.monotonic() < deadline:
            time.sleep(0.01)  # the reader thread drains the pty on its own
        got = list(stream.samples(max_samples=20, duration_s=5))
    stream.close()
    assert stream.stats.samples == 300 and stream.stats.dropped["overflow"] == 280
    assert stream.stats.dropped_total == 280 and stream.stats.to_dict()["dropped"] == {"overflow": 280}
    # What is left is the freshest readings, in order, values intact.
    assert [s.values for s in got] == [parse_line(x, label_column=-1).values for x in lines[-20:]]
    warned = [r.getMessage() for r in caplog.records if "dropped so far" in r.getMessage()]
    assert [w.split()[0] for w in warned] == ["1", "10", "100"]


def test_reader_thread_ends_with_the_port_and_inline_is_the_default() -> None:
    port = serial.serial_for_url("loop://", timeout=0.02)
    port.write(b"".join(f"{i},{i}\n".encode() for i in range(50)))
    with make_stream(lambda: port, resync=False, queue_size=100) as stream:
        got = list(stream.samples(max_samples=50, duration_s=5))
        assert stream._reader is not None and stream._reader.is_alive()
    assert [s.values[0] for s in got] == [float(i) for i in range(50)]
    assert not stream._reader.is_alive() and stream.stats.dropped_total == 0
    assert make_stream(lambda: port).queue_size is None  # inline unless asked: no thread
    with pytest.raises(ConfigError, match="queue_size"):
        make_stream(lambda: port, queue_size=0)
