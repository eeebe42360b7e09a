"""The apps on Flower's Deployment Engine: a real SuperLink and SuperNodes on 127.0.0.1, run with `flwr run`.

Every process started here is stopped here, by its PID (and its process group, which holds the
ServerApp/ClientApp processes the SuperLink and SuperNodes spawn).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.flower_loopback import Cluster, make_node_key, make_tls

# Not the "flower" group (Ray): SuperLink and SuperNodes are processes of their own, so the deployment
# tests run on the other worker, beside the simulations, and the two groups share the run time.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("deployment")]

# Replies are awaited this long in a round: far above a ClientApp's cold start on a loaded machine
# (see _run_config); a healthy round does not wait for it.
_ROUND_TIMEOUT_S = 150.0
# A whole run: three rounds, one of them slowed by a killed device, on a loaded 2-core machine.
_RUN_TIMEOUT_S = 480


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()


def _run_config(results: Path, rounds: int) -> str:
    """A small, fast run: head-only updates, one local epoch. Each message starts a fresh
    `flwr-clientapp` process (~8 s on a quiet 2-core machine, over 30 s when the rest of the suite runs
    beside it), so the reply timeout is generous: a healthy round ends when its replies are in, and a
    killed device's message ends with the SuperLink's "node unavailable" reply once its heartbeats stop
    (2 x 30 s), well inside the timeout."""
    return (
        f"rounds={rounds} results-path='{results}' min-nodes=2 node-wait-s=60.0 local-epochs=1 "
        f"round-timeout-s={_ROUND_TIMEOUT_S} scheme='last_layer' lr=0.01"
    )


def test_tls_and_supernode_authentication(tmp_path: Path) -> None:
    """TLS everywhere; a registered SuperNode trains a round, an unregistered one is refused."""
    cluster = Cluster(tmp_path, tls=make_tls(tmp_path))
    try:
        cluster.start_superlink()
        key, public = make_node_key(tmp_path, "node0")
        stranger, _ = make_node_key(tmp_path, "stranger")
        out = cluster.flwr("supernode", "register", str(public), "local", "--format", "json")
        assert out.returncode == 0, out.stdout + out.stderr + cluster.logs()
        cluster.start_supernode(0, 1, key=key)
        intruder = cluster.start_supernode(1, 2, key=stranger, name="unregistered")
        results = tmp_path / "results.json"
        config = (
            f"rounds=1 results-path='{results}' min-nodes=1 node-wait-s=60.0 local-epochs=1 "
            f"round-timeout-s={_ROUND_TIMEOUT_S} scheme='last_layer' lr=0.01"
        )
        run_id = cluster.run_app(config)
        status = cluster.wait_finished(run_id, timeout_s=_RUN_TIMEOUT_S)
        assert status == "finished:completed", cluster.logs()
        (record,) = json.loads(results.read_text())["rounds"]
        assert record["sampled"] == 1 and record["accepted"] == 1, f"{record}\n{cluster.logs()}"
        assert (tmp_path / "state-0" / "device.safetensors").exists()
        assert not (tmp_path / "state-1").exists()  # the unregistered node never got a message
        refused = (tmp_path / f"{intruder}.log").read_text()
        assert "SuperNode ID" not in refused, refused[-2000:]
    finally:
        cluster.stop_all()


def test_flwr_run_on_a_superlink_with_two_supernodes(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_superlink()
    cluster.start_supernode(0, 2)
    cluster.start_supernode(1, 2)
    results = tmp_path / "results.json"
    run_id = cluster.run_app(_run_config(results, rounds=2))
    status = cluster.wait_finished(run_id, timeout_s=_RUN_TIMEOUT_S)
    assert status == "finished:completed", cluster.logs()
    rounds = json.loads(results.read_text())["rounds"]
    assert [r["accepted"] for r in rounds] == [2, 2], f"{rounds}\n{cluster.logs()}"
    assert rounds[-1]["accuracy"] > 0.6  # last-layer on the pretrained backbone, 2 rounds, 10 classes
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rounds)
    for partition in (0, 1):
        assert (tmp_path / f"state-{partition}" / "device.safetensors").exists()


@pytest.mark.timeout(900)
def test_a_supernode_killed_mid_run_and_restarted(cluster: Cluster, tmp_path: Path) -> None:
    from federated.client import DeviceLearner
    from federated.config import FederatedConfig

    cluster.start_superlink()
    cluster.start_supernode(0, 2)
    cluster.start_supernode(1, 2)
    results = tmp_path / "results.json"
    run_id = cluster.run_app(_run_config(results, rounds=3))
    state = tmp_path / "state-1" / "device.safetensors"
    deadline = time.monotonic() + _ROUND_TIMEOUT_S + 60
    while not state.exists():  # node 1 has finished round 1
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.5)
    cluster.stop("supernode-1", signal.SIGKILL)
    cluster.start_supernode(1, 2)  # rejoins with a new node id; its learner state is on disk
    status = cluster.wait_finished(run_id, timeout_s=_RUN_TIMEOUT_S)
    assert status == "finished:completed", cluster.logs()
    rounds = json.loads(results.read_text())["rounds"]
    assert len(rounds) == 3 and rounds[-1]["accepted"] >= 1
    assert rounds[-1]["accuracy"] > 0.5
    config = FederatedConfig.from_dict(json.loads(results.read_text())["config"])
    learner = DeviceLearner(config, partition_id=1, num_partitions=2, state_dir=state.parent)
    assert learner.restored and learner.rounds_trained >= 2  # counted across the restart
