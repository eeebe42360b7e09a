"""What one dead device costs a real deployment: a SuperLink and three SuperNodes on loopback, `flwr run`.

Two runs of the same federation (5 rounds, ``min-nodes=3``, ``node-wait-s`` and ``round-timeout-s`` as
given): one where every device lives, one where a device's SuperNode is killed (SIGKILL, its process
group) just after round 2 started. The cost of the dead device is the difference of the two runs' wall
times, and it is compared with ``node-wait-s``: the server should pay for the dead device once (the round it
died in lasts until the SuperLink marks it offline, at most two missed 30 s heartbeats), not one
``node-wait-s`` per later round.

    python bench/dead_device.py                      # both runs, a table; --json for the figures
    python bench/dead_device.py --only killed        # just the run with the dead device

Every process started here is stopped here, by the PID of its process group. Timings depend on the
machine's load (each message starts a fresh ``flwr-clientapp`` process); compare runs made together.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root on the path, as for bench/memory.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.flower_loopback import APP_DIR, Cluster


def one_run(
    *, kill: bool, rounds: int, node_wait_s: float, round_timeout_s: float, limit_s: float
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ondevice-dead-device-") as folder:
        tmp = Path(folder)
        cluster = Cluster(tmp)
        try:
            cluster.start_superlink()
            for partition in range(3):
                cluster.start_supernode(partition, 3)
            results = tmp / "results.json"
            config = (
                f"rounds={rounds} results-path='{results}' min-nodes=3 node-wait-s={node_wait_s} "
                f"round-timeout-s={round_timeout_s} local-epochs=1 scheme='last_layer' lr=0.01"
            )
            started = time.monotonic()
            out = cluster.flwr("run", str(APP_DIR), "local", "--run-config", config, "--format", "json")
            if out.returncode != 0:
                raise RuntimeError(out.stdout + out.stderr)
            run_id = int(json.loads(out.stdout)["run-id"])
            killed_at = None
            status = ""
            while time.monotonic() - started < limit_s:
                done = json.loads(results.read_text())["rounds"] if results.exists() else []
                if kill and killed_at is None and len(done) >= 1:
                    cluster.stop("supernode-2", signal.SIGKILL)  # round 2's messages are out (or about to be)
                    killed_at = time.monotonic() - started
                status = cluster.run_status(run_id)
                if status.startswith("finished"):
                    break
                time.sleep(1.0)
            seconds = time.monotonic() - started
            rounds_done = json.loads(results.read_text())["rounds"] if results.exists() else []
            return {
                "killed": kill,
                "status": status,
                "wall_s": round(seconds, 1),
                "killed_at_s": None if killed_at is None else round(killed_at, 1),
                "rounds": [
                    {
                        "round": r["round"],
                        "asked": r["sampled"],
                        "accepted": r["accepted"],
                        "rejected": [reason for _, reason in r["rejected"]],
                        "seconds": round(r["seconds"], 1),
                        "accuracy": r["accuracy"],
                    }
                    for r in rounds_done
                ],
            }
        finally:
            cluster.stop_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--node-wait-s", type=float, default=120.0)
    parser.add_argument("--round-timeout-s", type=float, default=150.0)
    parser.add_argument("--only", choices=["healthy", "killed"], default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    limit = 60 + args.rounds * (args.round_timeout_s + args.node_wait_s)
    runs = {}
    for name in ("healthy", "killed"):
        if args.only in (None, name):
            runs[name] = one_run(
                kill=name == "killed",
                rounds=args.rounds,
                node_wait_s=args.node_wait_s,
                round_timeout_s=args.round_timeout_s,
                limit_s=limit,
            )
    report: dict[str, Any] = {
        "node_wait_s": args.node_wait_s,
        "round_timeout_s": args.round_timeout_s,
        **runs,
    }
    if "healthy" in runs and "killed" in runs:
        report["dead_device_cost_s"] = round(runs["killed"]["wall_s"] - runs["healthy"]["wall_s"], 1)
        report["cost_over_node_wait"] = round(report["dead_device_cost_s"] / args.node_wait_s, 2)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for name, run in runs.items():
        print(
            f"{name}: {run['status']} in {run['wall_s']} s"
            + (f", killed at {run['killed_at_s']} s" if run["killed"] else "")
        )
        for r in run["rounds"]:
            print(
                f"  round {r['round']}: asked {r['asked']}, accepted {r['accepted']}, {r['seconds']} s, "
                f"accuracy {r['accuracy']}, rejected {r['rejected']}"
            )
    if "dead_device_cost_s" in report:
        print(
            f"dead device cost: {report['dead_device_cost_s']} s = {report['cost_over_node_wait']} x "
            f"node-wait-s ({args.node_wait_s:g} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
