"""Serial sensor -> windows -> a tiny 1-D CNN that keeps learning on the device.

A device emulator on a pseudo-terminal plays an Arduino that prints accelerometer readings in the Edge
Impulse data forwarder format (``ax,ay,az,label``, one line per reading, with some garbage and split
writes, as a real USB serial line has). The host opens the pty like ``/dev/ttyACM0``, cuts the readings
into windows and trains on each window as it arrives. ``--port /dev/ttyACM0`` reads a real board instead.

    python examples/serial_to_learner.py --quick     # a few seconds
    python examples/serial_to_learner.py --port /dev/ttyACM0 --label-column -1 --seconds 60

A :class:`devices.session.SerialSession` does the reading, the reconnecting and the windowing; it builds
an ``ondevice`` continual learner at the first window, for the channel count the sensor sends: a zoo
``cnn1d`` prepared with the memory-saving ops, a class-balanced replay buffer of 64 windows, prequential
accuracy (each window is predicted before it is learned).
"""

from __future__ import annotations

import argparse
import time

import torch

from devices.models import WindowModel
from devices.ports import open_pty
from devices.session import SerialSession, SessionConfig
from devices.testing.emulator import SensorEmulator, sensor_lines
from ondevice import ClassifierModel, Learner, create_learner, prepare
from ondevice.continual import ObserveResult

CLASSES = ("idle", "wave")


def build_learner(model: ClassifierModel) -> Learner:
    """The learner for the small 1-D CNN the session builds, trained from scratch, with a replay buffer."""
    return create_learner(prepare(model, "full"), "replay", buffer_size=64, optimizer="sgd", lr=0.05, seed=0)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run on the emulator (seconds)")
    parser.add_argument("--port", help="a real serial port or pyserial URL instead of the emulator")
    parser.add_argument("--label-column", type=int, default=-1)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--hop", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long")
    parser.add_argument("--readings", type=int, default=None, help="stop after this many readings")
    args = parser.parse_args(argv)
    readings = args.readings or (1024 if args.quick else 6400)

    emulator = None
    if args.port:
        port = args.port
    else:
        device, port = open_pty()
        lines = sensor_lines(readings, channels=3, classes=CLASSES, segment=64, label_column=-1)
        emulator = SensorEmulator(
            device, lines, rate_hz=0 if args.quick else 400, garbage_every=97, split_writes=True
        )

    config = SessionConfig(
        port,
        window=args.window,
        hop=args.hop,
        label_column=args.label_column,
        labels=CLASSES,
        max_samples=readings,
        duration_s=args.seconds or (30 if args.quick else None),
        resync=emulator is None,  # the emulator starts on a line boundary; a real board may not
        model=WindowModel(num_classes=len(CLASSES), options={"channels": (8, 16)}),
    )
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    losses: list[float] = []
    hits: list[float] = []

    def record(x: torch.Tensor, y: torch.Tensor, outcome: ObserveResult) -> None:
        if outcome.loss is not None:  # each window is predicted first, then learned
            losses.append(outcome.loss)
            hits.append(outcome.accuracy or 0.0)
        seen.extend(zip(x.split(1), y.split(1), strict=True))

    session = SerialSession(config, build_learner, on_learn=record)
    start = time.monotonic()
    session.open()
    try:
        if emulator is not None:
            emulator.start()
        session.run()
    finally:
        if emulator is not None:
            emulator.close()
    learner = session.learner
    recent = seen[-100:]
    result = {
        "windows": float(len(seen)),
        "first_loss": sum(losses[:10]) / max(1, len(losses[:10])),
        "last_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "accuracy_last_100": (
            learner.accuracy((torch.cat([w[0] for w in recent]), torch.cat([w[1] for w in recent])))
            if learner is not None and recent
            else 0.0
        ),
        "prequential_accuracy_last_50": sum(hits[-50:]) / max(1, len(hits[-50:])),
        "seconds": time.monotonic() - start,
    }
    assert session.stream is not None
    stats = session.stream.stats
    print(
        f"read {stats.samples} readings ({stats.dropped_total} lines dropped: {dict(stats.dropped)}), "
        f"~{stats.sampling_rate_hz or 0:.0f} Hz, {stats.reconnects} reconnect(s)"
    )
    print(
        f"trained on {len(seen)} windows: loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}, "
        f"accuracy on the last 100 windows {result['accuracy_last_100']:.0%} "
        f"(prequential, last 50: {result['prequential_accuracy_last_50']:.0%}) in {result['seconds']:.1f} s"
    )
    return result


if __name__ == "__main__":
    main()
