"""A real Flower SuperLink and SuperNodes on 127.0.0.1: free ports, a CA and a 127.0.0.1 certificate,
SuperNode keys, and :class:`Cluster`, which starts the processes and stops them by PID.

Shared by ``bench/dead_device.py`` and the tests that run real deployments
(tests/federated/test_deployment.py, tests/federated/test_deploy_doc.py,
tests/devices/test_fleet_processes.py), as ``bench/library_models.py`` is by the library-model tests.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "examples" / "federated_app"
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_tls(tmp: Path) -> dict[str, Path]:
    """A CA and a SuperLink certificate for 127.0.0.1 (IP SAN) signed by it, as PEM files in ``tmp``."""
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


def make_node_key(tmp: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC key pair in OpenSSH format (what `ssh-keygen -t ecdsa -b 384` writes)."""
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


def stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, *, timeout_s: float = 20) -> None:
    """End ``proc``, started with ``start_new_session=True``, and everything in its process group (the
    ServerApp/ClientApp processes a SuperLink or SuperNode spawns), by its PID: ``sig``, then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):  # children of a leader that has exited
        os.killpg(proc.pid, signal.SIGKILL)


class Cluster:
    """A SuperLink and SuperNodes, started as process-group leaders, logs in ``tmp``.

    With ``tls`` (from :func:`make_tls`) every connection is TLS and the SuperLink only admits
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
        self.port = free_port()
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
                str(free_port()),
                "--node-config",
                node_config,
            ],
        )
        return name

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        stop_group(self.procs.pop(name), sig)

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

    def run_status(self, run_id: int) -> str:
        """The run's status as `flwr list` gives it (e.g. ``finished:completed``); empty when unknown."""
        out = self.flwr("list", "local", "--format", "json")
        if out.returncode != 0:
            return ""
        for run in json.loads(out.stdout).get("runs", []):
            if int(run.get("run-id", -1)) == run_id:
                return str(run.get("status", ""))
        return ""

    def wait_finished(self, run_id: int, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        status = ""
        while time.monotonic() < deadline:
            status = self.run_status(run_id) or status
            if status.startswith("finished"):
                return status
            time.sleep(1)
        raise AssertionError(
            f"run {run_id} not finished after {timeout_s} s (status {status!r}); {self.logs()}"
        )

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))
