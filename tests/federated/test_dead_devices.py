"""Rounds that survive dead devices: the server stops waiting for (and asking) a device that stopped
answering, and counts it again once it reconnects (:mod:`federated.roster`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, RecordDict

from federated.apps import make_client_app, make_server_app
from federated.config import FederatedConfig
from federated.roster import Roster

SMALL = {"name": "lite_residual", "expand": 0.125, "kernel_size": 3, "groups": 4}
SUPERLINK_NODE_ID = 1


def _config(rounds: int) -> FederatedConfig:
    return FederatedConfig(scheme=SMALL, rounds=rounds, num_clients=3, partition="iid", lr=3e-3)


def _context(run_config: dict[str, object]) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)  # type: ignore[arg-type]


def _scripted_grid(loopback_grid, client_app, *, listed, dead=None, silent=None):
    """A LoopbackGrid whose SuperLink lists ``listed[round]`` as connected, answers for the nodes in
    ``dead[round]`` as for an unreachable node, and gets no reply from ``silent[round]`` (rounds from 1).

    ``polls`` counts the SuperLink listings per round (one when the server does not wait)."""
    dead = dead or {}
    silent = silent or {}

    class Grid(loopback_grid):  # type: ignore[misc, valid-type]
        round = 1
        polls: dict[int, int] = {}  # noqa: RUF012
        asked: list[list[int]] = []  # noqa: RUF012

        def get_node_ids(self) -> Iterable[int]:
            self.polls[self.round] = self.polls.get(self.round, 0) + 1
            return sorted(listed.get(self.round, listed[max(listed)]))

        def send_and_receive(
            self, messages: Iterable[Message], *, timeout: float | None = None
        ) -> list[Message]:
            messages = list(messages)
            if not messages:  # Flower's evaluate step: devices run no federated evaluation
                return []
            self.asked.append(sorted(m.metadata.dst_node_id for m in messages))
            for message in messages:
                message.metadata.__dict__["_message_id"] = message.object_id
            gone = dead.get(self.round, set()) | silent.get(self.round, set())
            out = super().send_and_receive(
                [m for m in messages if m.metadata.dst_node_id not in gone], timeout=timeout
            )
            for message in messages:
                if message.metadata.dst_node_id in dead.get(self.round, set()):
                    stand_in = Message(RecordDict(), dst_node_id=SUPERLINK_NODE_ID, message_type="train")
                    stand_in.metadata.__dict__["_message_id"] = message.metadata.message_id
                    out.append(Message(Error(code=3, reason="node unavailable"), reply_to=stand_in))
            self.round += 1
            return out

    return Grid(client_app, 3)


def _run(grid, config: FederatedConfig, tmp_path: Path, **run_config: object) -> list:
    records: list = []
    app = make_server_app(config, on_round=records.append)
    # A wait for a node that never comes would last node-wait-s: an hour here, so a regression hangs the
    # test (and the suite's timeout names it) rather than passing slowly.
    app(grid, _context({"min-nodes": 3, "node-wait-s": 3600.0, **run_config}))
    return records


def test_a_device_that_dies_is_not_waited_for_nor_asked_again(loopback_grid, tmp_path: Path, caplog) -> None:
    config = _config(rounds=4)
    client = make_client_app(config, state_root=str(tmp_path / "state"))
    # 103 dies in round 2: the SuperLink answers for it, then stops listing it.
    grid = _scripted_grid(
        loopback_grid, client, listed={1: {101, 102, 103}, 2: {101, 102, 103}, 3: {101, 102}}, dead={2: {103}}
    )
    with caplog.at_level(logging.INFO, logger="federated"):
        records = _run(grid, config, tmp_path)
    assert grid.asked == [[101, 102, 103], [101, 102, 103], [101, 102], [101, 102]]
    assert [r.accepted for r in records] == [3, 2, 2, 2]
    assert grid.polls == {1: 1, 2: 1, 3: 1, 4: 1}  # no round waited for min-nodes=3
    assert not any("waiting for devices" in r.getMessage() for r in caplog.records)
    warnings = [r.getMessage() for r in caplog.records if r.name == "federated.roster"]
    assert warnings == [
        "round 2: node 103 stopped answering (the SuperLink answered for it: node unavailable); later rounds "
        "neither wait for it nor ask it until it reconnects"
    ]


def test_a_device_that_reconnects_is_asked_again(loopback_grid, tmp_path: Path, caplog) -> None:
    config = _config(rounds=4)
    client = make_client_app(config, state_root=str(tmp_path / "state"))
    # 103 leaves before round 2 (a restart), is back (same ID: authenticated) before round 4.
    listed = {1: {101, 102, 103}, 2: {101, 102}, 3: {101, 102}, 4: {101, 102, 103}}
    grid = _scripted_grid(loopback_grid, client, listed=listed)
    with caplog.at_level(logging.INFO, logger="federated"):
        records = _run(grid, config, tmp_path)
    assert grid.asked == [[101, 102, 103], [101, 102], [101, 102], [101, 102, 103]]
    assert [r.accepted for r in records] == [3, 2, 2, 3]
    assert grid.polls == {1: 1, 2: 1, 3: 1, 4: 1}
    lines = [r.getMessage() for r in caplog.records if r.name == "federated.roster"]
    assert lines[0].startswith("round 2: node 103 is no longer connected")
    assert lines[1] == "round 4: node 103 reconnected; it is asked again"


def test_a_connected_device_that_missed_the_deadline_rests_until_it_reconnects(
    loopback_grid, tmp_path: Path
) -> None:
    config = _config(rounds=5)
    client = make_client_app(config, state_root=str(tmp_path / "state"))
    # 103 gives no reply in round 1 but stays listed (a hung ClientApp, or a device killed less than two
    # heartbeats ago): not asked in rounds 2-3; it drops off the list in round 4 and is back in round 5.
    listed = {1: {101, 102, 103}, 2: {101, 102, 103}, 3: {101, 102, 103}, 4: {101, 102}, 5: {101, 102, 103}}
    grid = _scripted_grid(loopback_grid, client, listed=listed, silent={1: {103}})
    records = _run(grid, config, tmp_path)
    assert grid.asked == [[101, 102, 103], [101, 102], [101, 102], [101, 102], [101, 102, 103]]
    assert records[0].rejected == ((103, "no reply"),)
    assert [r.accepted for r in records] == [2, 2, 2, 2, 3]


def test_when_only_devices_that_stopped_answering_are_left_they_are_asked(
    loopback_grid, tmp_path: Path
) -> None:
    config = _config(rounds=2)
    client = make_client_app(config, state_root=str(tmp_path / "state"))
    grid = _scripted_grid(loopback_grid, client, listed={1: {101}}, silent={1: {101}})
    records = _run(grid, config, tmp_path, **{"min-nodes": 1, "node-wait-s": 0.0})
    assert grid.asked == [[101], [101]]  # better asked again than the run ended
    assert [r.accepted for r in records] == [0, 1]


def test_min_nodes_is_waited_for_before_the_first_round_only(loopback_grid, tmp_path: Path) -> None:
    config = _config(rounds=2)
    client = make_client_app(config, state_root=str(tmp_path / "state"))
    # Only two of the three devices ever connect: the first round waits node-wait-s, the second does not.
    grid = _scripted_grid(loopback_grid, client, listed={1: {101, 102}})
    records = _run(grid, config, tmp_path, **{"node-wait-s": 0.0})
    assert grid.asked == [[101, 102], [101, 102]] and [r.accepted for r in records] == [2, 2]


def test_no_device_at_all_ends_the_run_with_what_to_check(loopback_grid, tmp_path: Path) -> None:
    from federated.errors import FederatedError

    config = _config(rounds=1)
    grid = _scripted_grid(loopback_grid, make_client_app(config, state_root=str(tmp_path)), listed={1: set()})
    with pytest.raises(FederatedError, match=r"round 1: no device connected within node-wait-s=0 s; check"):
        _run(grid, config, tmp_path, **{"node-wait-s": 0.0})


def test_roster_by_itself() -> None:
    roster = Roster()
    roster.observe([1, 2, 3], 1)
    assert roster.available([1, 2, 3]) == [1, 2, 3]
    roster.stopped(3, "no reply", 1)
    assert roster.available([1, 2, 3]) == [1, 2]
    roster.observe([1, 2, 3], 2)  # still listed: still resting
    assert roster.available([1, 2, 3]) == [1, 2]
    roster.observe([1, 2], 3)
    roster.observe([1, 2, 3], 4)  # left and came back: counts again
    assert roster.available([1, 2, 3]) == [1, 2, 3]
    roster.stopped(2, "no reply", 5)
    roster.answered(2)  # it answered after all (e.g. asked when nobody else was left)
    assert roster.available([1, 2, 3]) == [1, 2, 3] and roster.lost == {}


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("min-nodes", 0, r"min-nodes must be a positive int .*got 0; pass e.g. --run-config \"min-nodes=3\""),
        ("min-nodes", True, r"min-nodes must be a positive int .*got True"),
        ("node-wait-s", -1.0, r"node-wait-s must be a number of seconds >= 0, got -1.0; pass e.g."),
        ("node-wait-s", "60", r"node-wait-s must be a number of seconds >= 0, got '60'"),
    ],
)
def test_bad_wait_settings_say_what_was_given_and_how_to_fix(
    loopback_grid, tmp_path: Path, key: str, value: object, match: str
) -> None:
    from ondevice.errors import ConfigError

    config = _config(rounds=1)
    grid = loopback_grid(make_client_app(config, state_root=str(tmp_path)), 1)
    with pytest.raises(ConfigError, match=match):
        make_server_app(config)(grid, _context({key: value}))
