"""federated/DEPLOY.md works as written: its commands, pasted in order into bash, give finished runs.

Every ```bash block of the doc (on one machine without TLS, then with TLS and SuperNode authentication) is run
as it stands, one after the other, in one bash process started at the repository's root. Only what must differ
on a test machine is set from outside, through the variables the doc itself defines: free ports
(``SUPERLINK_PORT``, ``NODE0_PORT``, ``NODE1_PORT``) and a scratch ``HOME``, under which the doc keeps
everything it writes; ``PATH`` starts with this environment's ``bin`` (the doc's "environment that has
ondevice[simulation] active").

Every process the doc starts is in the bash process's group; the test ends that group by the PID of the bash
it started, whether the doc's own ``kill`` line ran or not.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from bench.flower_loopback import BIN, ROOT, free_port, stop_group

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("deployment")]

DOC = ROOT / "federated" / "DEPLOY.md"
# Far above what its two runs (five rounds in all) take on a loaded 2-core machine.
_SCRIPT_TIMEOUT_S = 540


def shell_blocks(markdown: str) -> list[str]:
    """The bodies of the ```bash blocks of ``markdown``, in order (other fences are not for pasting)."""
    blocks: list[str] = []
    block: list[str] | None = None
    fence = ""
    for line in markdown.splitlines():
        stripped = line.strip()
        if not fence and stripped.startswith("```"):
            fence = stripped
            block = [] if stripped == "```bash" else None
        elif fence and stripped == "```":
            if block is not None:
                blocks.append("\n".join(block))
            fence, block = "", None
        elif block is not None:
            block.append(line)
    return blocks


def _group_members(pgid: int) -> list[str]:
    """``pid command`` of every live process in process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if rest[0] != "Z" and int(rest[2]) == pgid:
            members.append(f"{stat.parent.name} {name}")
    return members


def test_shell_blocks_are_the_bash_fences_in_order() -> None:
    markdown = (
        "# Doc\n```bash\na\n```\ntext\n```\nnot bash\n```\n## Sub\n```bash\nb\n\nc\n```\n```toml\nd\n```\n"
    )
    assert shell_blocks(markdown) == ["a", "b\n\nc"]


def _assert_rounds(path: Path, *, rounds: int, devices: int, output: str) -> None:
    records = json.loads(path.read_text())["rounds"]
    assert [r["round"] for r in records] == list(range(1, rounds + 1)), output[-6000:]
    assert all(r["accepted"] == devices for r in records), records
    assert records[-1]["accuracy"] > 0.5, records


@pytest.mark.timeout(_SCRIPT_TIMEOUT_S + 120)
def test_deploy_md_pasted_in_order_finishes_its_runs(tmp_path: Path) -> None:
    blocks = shell_blocks(DOC.read_text())
    assert len(blocks) >= 7, blocks  # without TLS: 4 blocks; with TLS and authentication: 3
    script = tmp_path / "pasted.sh"
    script.write_text("\n".join(blocks) + "\n")
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ)
    env.pop("FLWR_HOME", None)  # the doc sets its own
    env.update(
        HOME=str(home),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        SUPERLINK_PORT=str(free_port()),
        NODE0_PORT=str(free_port()),
        NODE1_PORT=str(free_port()),
    )
    log_path = tmp_path / "shell.log"
    with open(log_path, "wb") as log:
        shell = subprocess.Popen(
            ["bash", "--noprofile", "--norc", str(script)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        try:
            returncode = shell.wait(timeout=_SCRIPT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the doc's blocks did not finish in {_SCRIPT_TIMEOUT_S} s\n{log_path.read_text()[-6000:]}"
            ) from None
        output = log_path.read_text()
        assert returncode == 0, output[-6000:]
        # Without TLS: three rounds, two devices
        assert "round 3/3: 2 device(s) asked" in output, output[-6000:]
        _assert_rounds(home / "rounds.json", rounds=3, devices=2, output=output)
        for node in ("node0", "node1"):
            assert (home / "ondevice-state" / node / "device.safetensors").exists()
        assert (home / ".flwr-ondevice" / "config.toml").exists()
        assert not (home / ".flwr").exists()  # every process used the doc's own Flower home
        # With TLS and authentication: two rounds, the two registered devices
        _assert_rounds(home / "rounds-tls.json", rounds=2, devices=2, output=output)
        for node in ("tls-node0", "tls-node1"):
            assert (home / "ondevice-state" / node / "device.safetensors").exists()
        assert output.count('"status": "finished:completed"') == 2, output[-6000:]
        # The doc's last block stopped what its first one started.
        deadline = time.monotonic() + 60
        while (left := _group_members(shell.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"still running after the doc's kill line: {left}\n{output[-3000:]}"
    finally:
        stop_group(shell)
