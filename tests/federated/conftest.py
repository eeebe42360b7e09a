"""Federated tests: a private Flower home, and an in-process Grid that delivers messages to ClientApps."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="ondevice-flwr-home-"))


class LoopbackGrid(Grid):
    """A Grid that hands every message to a real ClientApp in this process (one per node id).

    ``tamper`` may replace the reply of a node (to play a poisoned or broken device); ``replies`` keeps
    every reply as produced by the honest ClientApp, before tampering.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        tamper: Callable[[int, Message], Message] | None = None,
    ) -> None:
        self.client_app = client_app
        self.nodes = list(range(101, 101 + num_nodes))
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i, node in enumerate(self.nodes)
        }
        self.tamper = tamper
        self.replies: list[tuple[int, Message]] = []

    def set_run(self, run: object) -> None:  # pragma: no cover - not used in-process
        raise NotImplementedError

    @property
    def run(self) -> object:  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def get_nodes(self) -> Iterable[object]:  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            reply = self.client_app(message, self.contexts[node])
            self.replies.append((node, reply))
            out.append(self.tamper(node, reply) if self.tamper else reply)
        return out


@pytest.fixture
def loopback_grid() -> Iterator[type[LoopbackGrid]]:
    """The LoopbackGrid class, with Flower's process identity set as a ServerApp process has it."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    try:
        yield LoopbackGrid
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
