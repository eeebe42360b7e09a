"""Serial sensor -> windows -> a tiny 1-D CNN that keeps learning on the device.

A device emulator on a pseudo-terminal plays an Arduino that prints accelerometer readings in the Edge
Impulse data forwarder format (``ax,ay,az,label``, one line per reading, with some garbage and split
writes, as a real USB serial line has). The host opens the pty like ``/dev/ttyACM0``, cuts the readings
into windows and trains on each window as it arrives. ``--port /dev/ttyACM0`` reads a real board instead.

    python examples/serial_to_learner.py --quick     # a few seconds
    python examples/serial_to_learner.py --port /dev/ttyACM0 --label-column -1 --seconds 60

Each window goes to an ``ondevice`` continual learner (``learner.observe(x, y)``): a zoo ``cnn1d``
prepared with the memory-saving ops, a class-balanced replay buffer of 64 windows, prequential accuracy
(each window is predicted before it is learned).
"""

from __future__ import annotations

import argparse
import time

import torch

from devices.emulator import SensorEmulator, sensor_lines
from devices.lines import SampleStream, Windower
from devices.ports import open_pty
from ondevice import Learner, create_learner, create_model, prepare

CLASSES = ("idle", "wave")


def build_learner(channels: int, window: int, classes: int) -> Learner:
    """A small 1-D CNN from the zoo, trained from scratch on the device, with a replay buffer."""
    model = create_model("cnn1d", in_channels=channels, length=window, num_classes=classes, channels=(8, 16))
    prepared = prepare(model, "full")
    return create_learner(prepared, "replay", buffer_size=64, optimizer="sgd", lr=0.05, seed=0)


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
    torch.manual_seed(0)

    emulator = None
    if args.port:
        port = args.port
    else:
        device, port = open_pty()
        lines = sensor_lines(readings, channels=3, classes=CLASSES, segment=64, label_column=-1)
        emulator = SensorEmulator(
            device, lines, rate_hz=0 if args.quick else 400, garbage_every=97, split_writes=True
        )

    learner = build_learner(3, args.window, len(CLASSES))
    windower = Windower(args.window, args.hop, labels=CLASSES)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    losses: list[float] = []
    hits: list[float] = []
    start = time.monotonic()
    with SampleStream(port, label_column=args.label_column, resync=emulator is None) as stream:
        stream.port.ensure_open()
        if emulator is not None:
            emulator.start()
        for sample in stream.samples(
            max_samples=readings, duration_s=args.seconds or (30 if args.quick else None)
        ):
            for x, y in windower.push(sample):
                if int(y) < 0:
                    continue
                outcome = learner.observe(x, y)  # predicts the window first, then learns from it
                if outcome.loss is not None:
                    losses.append(outcome.loss)
                    hits.append(outcome.accuracy or 0.0)
                seen.append((x, y))
    if emulator is not None:
        emulator.close()
    result = {
        "windows": float(len(seen)),
        "first_loss": sum(losses[:10]) / max(1, len(losses[:10])),
        "last_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "accuracy_last_100": (
            learner.accuracy((torch.cat([w[0] for w in seen[-100:]]), torch.cat([w[1] for w in seen[-100:]])))
            if seen
            else 0.0
        ),
        "prequential_accuracy_last_50": sum(hits[-50:]) / max(1, len(hits[-50:])),
        "seconds": time.monotonic() - start,
    }
    stats = stream.stats
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
