"""Which devices the server counts on: those connected to the SuperLink, minus those that stopped answering.

A device *stops answering* when, in a round it was asked in,

- the SuperLink answered for it (its heartbeats stopped: Flower marks a SuperNode offline after two
  missed 30 s heartbeats and makes up an error reply for every message still waiting for it), or
- no reply came back before the round's deadline (``round-timeout-s``), or
- it dropped out of the SuperLink's list of connected nodes (``grid.get_node_ids()``) between rounds.

From then on the server neither waits for it nor asks it, so one dead device costs at most the round it
died in, not one wait per later round. It counts again once it *reconnects*: it was seen gone from the
SuperLink's list and is listed again (a restarted SuperNode with authentication keeps its node ID; without
authentication it comes back under a new ID, which is simply a new device). A device whose ClientApp
failed but that answered with an error of its own is still answering.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Absence", "Roster"]

logger = logging.getLogger(__name__)


@dataclass
class Absence:
    """Why a device is not waited for: what happened, in which round, and whether it has left the list."""

    reason: str
    server_round: int
    gone: bool = False


class Roster:
    """The devices of a run as the server sees them across rounds (see the module docstring).

    Attributes:
        seen: every node ID the SuperLink listed as connected during this run.
        lost: node ID -> :class:`Absence`, for the devices that stopped answering and have not reconnected.
    """

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.lost: dict[int, Absence] = {}

    def observe(self, connected: Iterable[int], server_round: int) -> None:
        """Take in the SuperLink's current list of connected nodes (before a round)."""
        listed = set(connected)
        for node in sorted(self.seen - listed):
            absence = self.lost.get(node)
            if absence is None:
                self.lost[node] = Absence(
                    "it left the SuperLink's list of connected nodes", server_round, True
                )
                logger.warning(
                    "round %d: node %d is no longer connected; rounds go on without waiting for it until it "
                    "reconnects",
                    server_round,
                    node,
                )
            else:
                absence.gone = True
        for node in sorted(listed & set(self.lost)):
            if self.lost[node].gone:
                del self.lost[node]
                logger.info("round %d: node %d reconnected; it is asked again", server_round, node)
        self.seen |= listed

    def available(self, connected: Iterable[int]) -> list[int]:
        """The connected nodes that have not stopped answering, sorted."""
        return sorted(set(connected) - set(self.lost))

    def stopped(self, node: int, reason: str, server_round: int) -> None:
        """Record that ``node`` did not answer in ``server_round`` (``reason`` says how)."""
        if node not in self.lost:
            logger.warning(
                "round %d: node %d stopped answering (%s); later rounds neither wait for it nor ask it "
                "until it reconnects",
                server_round,
                node,
                reason,
            )
        self.lost[node] = Absence(reason, server_round)

    def answered(self, node: int) -> None:
        """Record that ``node`` answered (a reply of its own, even an error): it counts again."""
        self.lost.pop(node, None)
