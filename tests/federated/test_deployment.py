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

# Not the "flower" group (Ray): SuperLink and SuperNodes are processes of their own, so the deployment
# tests run on the other worker, beside the simulations, and the two groups share the run time.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("deployment")]

ROOT = Path(__file__).resolve().parents[2]
APP_DIR = ROOT / "examples" / "federated_app"
BIN = Path(sys.executable).parent
# Replies are awaited this long in a round: far above a ClientApp's cold start on a loaded machine
# (see _run_config); a healthy round does not wait for it.
_ROUND_TIMEOUT_S = 150.0
# A whole run: three rounds, one of them slowed by a killed device, on a loaded 2-core machine.
_RUN_TIMEOUT_S = 480


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _make_tls(tmp: Path) -> dict[str, Path]:
    """A CA and a SuperLink certificate for 127.0.0.1 (IP SAN) signed by it, as PEM files in ``tmp``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ondevice-test-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "superlink")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": tmp / "ca.pem", "cert": tmp / "server.pem", "key": tmp / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def _make_node_key(tmp: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC key pair in OpenSSH format (what `ssh-keygen -t ecdsa -b 384` writes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = tmp / name, tmp / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public


class Cluster:
    """A SuperLink and SuperNodes, started as process-group leaders, logs in ``tmp``.

    With ``tls`` (from :func:`_make_tls`) every connection is TLS and the SuperLink only admits
    registered SuperNodes (``--enable-supernode-auth``).
    """

    def __init__(self, tmp: Path, tls: dict[str, Path] | None = None) -> None:
        self.tmp = tmp
        self.tls = tls
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
        security = "insecure = true" if tls is None else f'root-certificates = "{tls["ca"]}"'
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n'
            f"{security}\n"
        )

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp, start_new_session=True
        )

    def start_superlink(self) -> None:
        if self.tls is None:
            security = ["--insecure"]
        else:
            security = [
                "--ssl-ca-certfile",
                str(self.tls["ca"]),
                "--ssl-certfile",
                str(self.tls["cert"]),
                "--ssl-keyfile",
                str(self.tls["key"]),
                "--enable-supernode-auth",
            ]
        self._start(
            "superlink",
            [str(BIN / "flower-superlink"), *security, "--host", "127.0.0.1", "--port", str(self.port)],
        )
        self.wait_listening()

    def wait_listening(self, timeout_s: float = 60) -> None:
        """Block until the SuperLink accepts connections on its port."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"the SuperLink is not listening after {timeout_s} s; {self.logs()}"
                    ) from None
                time.sleep(0.2)

    def start_supernode(
        self, partition: int, partitions: int, *, key: Path | None = None, name: str | None = None
    ) -> str:
        """Start a SuperNode (authenticated with the private ``key`` under TLS); returns its name."""
        state = self.tmp / f"state-{partition}"
        node_config = f"partition-id={partition} num-partitions={partitions} state-dir='{state}'"
        if self.tls is None:
            security = ["--insecure"]
        else:
            assert key is not None, "under TLS a SuperNode needs its private key"
            security = ["--root-certificates", str(self.tls["ca"]), "--auth-supernode-private-key", str(key)]
        name = name or f"supernode-{partition}"
        self._start(
            name,
            [
                str(BIN / "flower-supernode"),
                *security,
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
        return name

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
        payload = json.loads(out.stdout)
        assert "run-id" in payload, f"{payload}\n{self.logs()}"
        return int(payload["run-id"])

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
            time.sleep(1)
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
    cluster = Cluster(tmp_path, tls=_make_tls(tmp_path))
    try:
        cluster.start_superlink()
        key, public = _make_node_key(tmp_path, "node0")
        stranger, _ = _make_node_key(tmp_path, "stranger")
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
