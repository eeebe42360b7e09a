"""What the server shows while it runs: one log line per round and the results file after every round."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, RecordDict

from federated.apps import make_client_app, make_server_app
from federated.config import FederatedConfig

SMALL = {"name": "lite_residual", "expand": 0.125, "kernel_size": 3, "groups": 4}
SUPERLINK_NODE_ID = 1  # the source of a reply the SuperLink makes up for a node it cannot reach


def _config(**kwargs: object) -> FederatedConfig:
    base = {"scheme": SMALL, "rounds": 2, "num_clients": 3, "partition": "iid", "lr": 3e-3}
    base.update(kwargs)
    return FederatedConfig(**base)  # type: ignore[arg-type]


def _context(run_config: dict[str, object]) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)  # type: ignore[arg-type]


def _grid_with_a_dead_node(loopback_grid, client_app, num_nodes: int, dead: int):
    """A LoopbackGrid that gives messages IDs as Flower's grid does, and answers for ``dead`` as the
    SuperLink answers for an unreachable node: an error reply whose source is the SuperLink."""

    class Grid(loopback_grid):  # type: ignore[misc, valid-type]
        def send_and_receive(
            self, messages: Iterable[Message], *, timeout: float | None = None
        ) -> list[Message]:
            messages = list(messages)
            for message in messages:
                message.metadata.__dict__["_message_id"] = message.object_id
            alive = [m for m in messages if m.metadata.dst_node_id != dead]
            out = super().send_and_receive(alive, timeout=timeout)
            for message in messages:
                if message.metadata.dst_node_id == dead:
                    stand_in = Message(RecordDict(), dst_node_id=SUPERLINK_NODE_ID, message_type="train")
                    stand_in.metadata.__dict__["_message_id"] = message.metadata.message_id
                    out.append(Message(Error(code=3, reason="node unavailable"), reply_to=stand_in))
            return out

    return Grid(client_app, num_nodes)


def test_each_round_is_logged_and_written_as_it_ends(loopback_grid, tmp_path: Path, caplog) -> None:
    config = _config()
    results = tmp_path / "rounds.json"
    seen: list[list[int]] = []  # the rounds in the results file when each round's callback runs

    def on_round(record) -> None:
        seen.append([r["round"] for r in json.loads(results.read_text())["rounds"]])

    grid = _grid_with_a_dead_node(
        loopback_grid, make_client_app(config, state_root=str(tmp_path / "state")), 3, dead=103
    )
    app = make_server_app(config, on_round=on_round)
    with caplog.at_level(logging.INFO, logger="federated"):
        app(grid, _context({"results-path": str(results), "min-nodes": 3}))

    assert seen == [[1], [1, 2]]  # written after every round, not only at the end
    payload = json.loads(results.read_text())
    assert FederatedConfig.from_dict(payload["config"]) == config
    first_round, second_round = payload["rounds"]
    assert first_round["asked"] == [101, 102, 103] and first_round["accepted"] == 2
    # The dead node is named by its own ID, not by the SuperLink's.
    assert first_round["rejected"] == [[103, "error reply: node unavailable"]]
    # It stopped answering: the next round neither waits for it (min-nodes=3) nor asks it.
    assert second_round["asked"] == [101, 102] and second_round["rejected"] == []
    for record in payload["rounds"]:
        assert record["bytes_down"] > 0 and record["bytes_up"] > 0 and record["accuracy"] is not None
    lines = [r.getMessage() for r in caplog.records if r.name == "federated.apps"]
    summaries = [line for line in lines if line.startswith("round ") and "answered" in line]
    assert len(summaries) == 2
    first = summaries[0]
    assert first.startswith(
        "round 1/2: 3 device(s) asked [101, 102, 103], 3 answered, 2 accepted, 1 rejected"
    )
    assert "[node 103: error reply: node unavailable]" in first
    assert "accuracy 0." in first and "bytes down" in first and "bytes up" in first
    assert not any(f"node {SUPERLINK_NODE_ID}:" in line for line in lines)
    gone = [r.getMessage() for r in caplog.records if r.name == "federated.roster"]
    assert any(
        line.startswith("round 1: node 103 stopped answering (the SuperLink answered") for line in gone
    )
    assert not any("waiting for devices" in r.getMessage() for r in caplog.records)
    # Flower's console handler shows them (what `flwr log` prints) only while the ServerApp runs.
    from flwr.common.logger import console_handler

    assert console_handler not in logging.getLogger("federated").handlers


def test_a_device_that_never_answers_is_named(loopback_grid, tmp_path: Path) -> None:
    config = _config(rounds=1)

    class Grid(loopback_grid):  # type: ignore[misc, valid-type]
        def send_and_receive(
            self, messages: Iterable[Message], *, timeout: float | None = None
        ) -> list[Message]:
            return super().send_and_receive(
                [m for m in messages if m.metadata.dst_node_id != 102], timeout=timeout
            )

    records = []
    app = make_server_app(config, on_round=records.append)
    app(Grid(make_client_app(config, state_root=str(tmp_path)), 2), _context({}))
    (record,) = records
    assert record.replies == 1 and record.accepted == 1 and record.rejected == ((102, "no reply"),)
    assert "[node 102: no reply]" in record.summary(1)


@pytest.mark.parametrize("value", ["", None])
def test_no_results_path_writes_nothing(loopback_grid, tmp_path: Path, value) -> None:
    config = _config(rounds=1)
    app = make_server_app(config)
    run_config = {} if value is None else {"results-path": value}
    app(loopback_grid(make_client_app(config, state_root=str(tmp_path / "s")), 1), _context(run_config))
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
