"""The apps on Flower's Deployment Engine: a real SuperLink and SuperNodes on 127.0.0.1, run with `flwr run`.

Every process started here is stopped here, by its PID (and its process group, which holds the
ServerApp/ClientApp processes the SuperLink and SuperNodes spawn).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
APP_DIR = ROOT / "examples" / "federated_app"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """A SuperLink and SuperNodes, started as process-group leaders, logs in ``tmp``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = dict(os.environ)
        self.env.update(
            FLWR_HOME=str(tmp / "flwr-home"),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        self.port = _free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n'
            f"insecure = true\n"
        )

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp, start_new_session=True
        )

    def start_superlink(self) -> None:
        self._start(
            "superlink",
            [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port)],
        )

    def start_supernode(self, partition: int, partitions: int) -> None:
        state = self.tmp / f"state-{partition}"
        node_config = f"partition-id={partition} num-partitions={partitions} state-dir='{state}'"
        self._start(
            f"supernode-{partition}",
            [
                str(BIN / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(_free_port()),
                "--node-config",
                node_config,
            ],
        )

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def stop_all(self) -> None:
        for name in [n for n in self.procs if n != "superlink"] + [n for n in self.procs if n == "superlink"]:
            self.stop(name)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.tmp,
        )

    def run_app(self, run_config: str) -> int:
        out = self.flwr("run", str(APP_DIR), "local", "--run-config", run_config, "--format", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        return int(json.loads(out.stdout)["run-id"])

    def wait_finished(self, run_id: int, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        status = ""
        while time.monotonic() < deadline:
            out = self.flwr("list", "local", "--format", "json")
            if out.returncode == 0:
                runs = json.loads(out.stdout).get("runs", [])
                for run in runs:
                    if int(run.get("run-id", -1)) == run_id:
                        status = str(run.get("status", ""))
                if status.startswith("finished"):
                    return status
            time.sleep(2)
        raise AssertionError(
            f"run {run_id} not finished after {timeout_s} s (status {status!r}); {self.logs()}"
        )

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()


def _run_config(results: Path, rounds: int) -> str:
    return (
        f"rounds={rounds} results-path='{results}' min-nodes=2 local-epochs=1 round-timeout-s=40.0 "
        f"scheme='last_layer' lr=0.01"
    )


def test_flwr_run_on_a_superlink_with_two_supernodes(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_superlink()
    cluster.start_supernode(0, 2)
    cluster.start_supernode(1, 2)
    results = tmp_path / "results.json"
    run_id = cluster.run_app(_run_config(results, rounds=2))
    status = cluster.wait_finished(run_id, timeout_s=240)
    assert status == "finished:completed", cluster.logs()
    rounds = json.loads(results.read_text())["rounds"]
    assert [r["accepted"] for r in rounds] == [2, 2]
    assert rounds[-1]["accuracy"] > 0.6  # last-layer on the pretrained backbone, 2 rounds, 10 classes
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rounds)
    for partition in (0, 1):
        assert (tmp_path / f"state-{partition}" / "device.safetensors").exists()


def test_a_supernode_killed_mid_run_and_restarted(cluster: Cluster, tmp_path: Path) -> None:
    from federated.config import FederatedConfig
    from federated.device import DeviceLearner

    cluster.start_superlink()
    cluster.start_supernode(0, 2)
    cluster.start_supernode(1, 2)
    results = tmp_path / "results.json"
    run_id = cluster.run_app(_run_config(results, rounds=4))
    state = tmp_path / "state-1" / "device.safetensors"
    deadline = time.monotonic() + 180
    while not state.exists():  # node 1 has finished round 1
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.5)
    cluster.stop("supernode-1", signal.SIGKILL)
    time.sleep(3)
    cluster.start_supernode(1, 2)  # rejoins with a new node id; its learner state is on disk
    status = cluster.wait_finished(run_id, timeout_s=300)
    assert status == "finished:completed", cluster.logs()
    rounds = json.loads(results.read_text())["rounds"]
    assert len(rounds) == 4 and rounds[-1]["accepted"] >= 1
    config = FederatedConfig.from_dict(json.loads(results.read_text())["config"])
    learner = DeviceLearner(config, partition_id=1, num_partitions=2, state_dir=state.parent)
    assert learner.restored and learner.rounds_trained >= 2  # counted across the restart
