"""Federated benchmark: lite-residual vs full-model FedAvg, the cost of compression, and 100 devices.

Run: ``python bench/federated.py [--json] [--skip-scale]``. Everything comes from one run on Flower's
Simulation Engine (``federated.simulate``): 10 devices, 5 rounds, the digits split Dirichlet(0.3), the
backbone pretrained on digits 0-4 and the devices learning all ten. Bytes are the array bytes of the
messages actually sent (downlink broadcast + uplink replies, per round, all devices); peak memory is the
largest resident set of this process and all its descendants (Ray's workers), sampled every 0.2 s.

Adam, 2 local epochs, batch 16. Full fine-tuning runs at its best learning rate from the grid
{1e-3, 3e-3, 1e-2} (3e-3, the baseline the gap and ratio refer to) and at 1e-2; the small lite-residual
branches at 2e-2 (best of {3e-3, 1e-2, 2e-2, 3e-2}).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

#: TinyTL lite residual branches sized for the 8x8 CNN: a quarter of the block width, 3x3 group convs
#: with 8 groups, no pooling (8x8 inputs are already tiny), plus biases and the head.
SMALL_LITE_RESIDUAL = {
    "name": "lite_residual",
    "expand": 0.25,
    "kernel_size": 3,
    "groups": 8,
    "downsample": 1,
}

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("full (fp32), lr 3e-3", {"scheme": "full", "lr": 3e-3}),
    ("full (fp32), lr 1e-2", {"scheme": "full", "lr": 1e-2}),
    (
        "lite_residual (fp16)",
        {"scheme": SMALL_LITE_RESIDUAL, "lr": 2e-2, "compression": "fp16", "downlink": "fp16"},
    ),
    ("lite_residual (fp32)", {"scheme": SMALL_LITE_RESIDUAL, "lr": 2e-2}),
    (
        "lite_residual (int8 up)",
        {"scheme": SMALL_LITE_RESIDUAL, "lr": 2e-2, "compression": "int8", "downlink": "fp16"},
    ),
    (
        "lite_residual (top-10% up)",
        {"scheme": SMALL_LITE_RESIDUAL, "lr": 2e-2, "compression": "topk:0.1", "downlink": "fp16"},
    ),
]
COMMON = {"num_clients": 10, "rounds": 5, "partition": "dirichlet:0.3", "local_epochs": 2, "batch_size": 16}


class PeakRss:
    """Largest summed RSS of this process and its descendants, sampled in a thread."""

    def __init__(self, interval_s: float = 0.2) -> None:
        import psutil

        self._root = psutil.Process()
        self._interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for proc in [self._root, *self._root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._sample())
            self._stop.wait(self._interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Row:
    name: str
    accuracy: float
    accuracy_per_round: list[float]
    bytes_down_per_round: float
    bytes_up_per_round: float
    trainable_params: int
    seconds: float
    peak_rss_bytes: int

    @property
    def bytes_per_round(self) -> float:
        return self.bytes_down_per_round + self.bytes_up_per_round


def _run(name: str, overrides: dict[str, Any]) -> Row:
    import federated
    from federated.device import build_model

    config = federated.FederatedConfig(**{**COMMON, **overrides})
    params = build_model(config).report.trainable_params
    with PeakRss() as peak:
        result = federated.simulate(config)
    rounds = result.rounds
    row = Row(
        name=name,
        accuracy=float(result.final_accuracy or 0.0),
        accuracy_per_round=[float(r.accuracy or 0.0) for r in rounds],
        bytes_down_per_round=sum(r.bytes_down for r in rounds) / len(rounds),
        bytes_up_per_round=sum(r.bytes_up for r in rounds) / len(rounds),
        trainable_params=params,
        seconds=result.seconds,
        peak_rss_bytes=peak.peak_bytes,
    )
    print(
        f"  {name}: accuracy {row.accuracy:.4f}, {row.bytes_per_round:,.0f} B/round, {row.seconds:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument("--skip-scale", action="store_true", help="skip the 100-device run")
    parser.add_argument("--only", default="", help="comma-separated variant indices to run (0 = full)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)

    chosen = [VARIANTS[int(i)] for i in args.only.split(",")] if args.only else VARIANTS
    print("federated benchmark: 10 devices, 5 rounds, Dirichlet(0.3)", file=sys.stderr)
    rows = [_run(name, overrides) for name, overrides in chosen]
    scale: Row | None = None
    if not args.skip_scale:
        print("scale: 100 devices, 3 rounds, lite_residual (fp16)", file=sys.stderr)
        scale = _run(
            "100 devices x 3 rounds",
            {**VARIANTS[2][1], "num_clients": 100, "rounds": 3, "local_epochs": 1},
        )
    baseline = rows[0] if rows and rows[0].name.startswith("full") else None
    payload = {
        "setting": {**COMMON, "pretrain_classes": [0, 1, 2, 3, 4], "classes": list(range(10))},
        "rows": [
            {
                **row.__dict__,
                "bytes_per_round": row.bytes_per_round,
                "accuracy_gap_points": None if baseline is None else 100 * (baseline.accuracy - row.accuracy),
                "bytes_ratio_vs_full": None
                if baseline is None
                else baseline.bytes_per_round / row.bytes_per_round,
            }
            for row in rows
        ],
        "scale": None if scale is None else {**scale.__dict__, "bytes_per_round": scale.bytes_per_round},
    }
    if args.json:
        print(json.dumps(payload, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    from memory import format_bytes

    table = Table(title="FedAvg, 10 devices, 5 rounds, digits Dirichlet(0.3) (backbone pretrained on 0-4)")
    for column in ("variant", "params sent", "accuracy", "gap (pts)", "bytes/round", "vs full", "time (s)"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for item in payload["rows"]:
        table.add_row(
            item["name"],
            f"{item['trainable_params']:,}",
            f"{item['accuracy']:.4f}",
            "-" if item["accuracy_gap_points"] is None else f"{item['accuracy_gap_points']:+.1f}",
            format_bytes(int(item["bytes_per_round"])),
            "-" if item["bytes_ratio_vs_full"] is None else f"{item['bytes_ratio_vs_full']:.1f}x fewer",
            f"{item['seconds']:.0f}",
        )
    console = Console()
    console.print(table)
    if scale is not None:
        console.print(
            f"100 devices x 3 rounds: {scale.seconds:.0f} s, peak RSS (process tree) "
            f"{format_bytes(scale.peak_rss_bytes)}, final accuracy {scale.accuracy:.4f}"
        )


if __name__ == "__main__":
    main()
