"""Which volunteer serves which node, as the coordinator sees it.

A join is checked (the node's tokenizer must be the run's, and a node id is served by one
process at a time), then welcomed or refused (`answer`); a leave (a goodbye, or the last will the
broker publishes for a silent node) marks the node absent. Rounds go only to present
nodes; before a round the coordinator may wait here for anyone to be present, or, after a
broker outage, for the nodes that were there before it to come back.

A host that claims nodes (`collective node --claim N`) is assigned N nodes that no live
process serves and no other claim holds; they stay reserved for it until they join (or for
CLAIM_HOLD_S, the time a host may take to load its models).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from collective.distributed.payloads import (
    AssignPayload,
    ClaimPayload,
    JoinPayload,
    LeavePayload,
    RefusePayload,
    WelcomePayload,
)
from collective.scenario import Scenario

log = logging.getLogger(__name__)

REJOIN_GRACE_S = 10.0  # after a broker outage, how long the next round waits for the nodes to come back
WILLS_BEFORE_OUTAGE_S = 2.0  # a broker that shuts down first publishes every client's last will
CLAIM_HOLD_S = 900.0  # how long nodes assigned to a claim wait for its host to join them


@dataclass
class VolunteerStatus:
    """The coordinator's record of the volunteer process that serves one node id."""

    node_id: str
    session: str | None = None
    present: bool = False
    host: str = ""
    device: str = ""
    rejected: dict[str, int] = field(default_factory=dict)  # what the node dropped, as it last reported
    missing_messages: int = 0
    left_at: float | None = None  # loop time of its last leave
    via: str = ""  # whose topics serve it: its own id (a lone node) or its host's id

    def __post_init__(self) -> None:
        self.via = self.via or self.node_id


@dataclass(frozen=True)
class NodeSnapshot:
    node_id: str
    present: bool
    host: str
    device: str


class Roster:
    """The volunteers of one run; `changed` is set on every join and leave (and, by the round
    collector, on every accepted result), so that waits wake up when something happened."""

    def __init__(self, scenario: Scenario, digests: dict[str, str], vocab_sizes: dict[str, int]) -> None:
        self.scenario = scenario
        self.digests = digests  # model alias -> tokenizer digest
        self.vocab_sizes = vocab_sizes  # model alias -> vocabulary size
        self.nodes = {n: VolunteerStatus(n) for n in scenario.node_ids}
        self.changed = asyncio.Event()
        self._expect_back: set[str] = set()
        self._expect_until = 0.0
        self._claims: dict[str, tuple[list[str], float]] = {}  # claim session -> (its nodes, held until)

    # ------------------------------------------------------------------ joins and leaves

    def refusal(self, node_id: str, join: JoinPayload) -> str | None:
        """Why this join is refused (a foreign tokenizer, a second process), or None."""
        alias = self.scenario.node(node_id).model
        state = self.nodes[node_id]
        if join.vocab_size != self.vocab_sizes[alias] or join.tokenizer_digest != self.digests[alias]:
            return (
                f"node {node_id} loaded {join.model!r} whose tokenizer (vocabulary {join.vocab_size}) differs from "
                f"the run's model {alias!r} ({self.vocab_sizes[alias]} tokens): load the model the scenario names"
            )
        if join.via is not None and join.via != node_id and join.via in self.nodes:
            return f"node {node_id} names node {join.via!r} as its host: a host id is never a node id"
        if state.present and join.session != state.session:
            return (
                f"node {node_id} is already served by another process (on {state.host or 'an unnamed host'}); "
                "stop that one first (a silent one times out within 30 s), or serve another node id"
            )
        return None

    def answer(self, node_id: str, join: JoinPayload) -> WelcomePayload | RefusePayload:
        """Admit the join and welcome it, or refuse it with the reason."""
        reason = self.refusal(node_id, join)
        if reason is not None:
            return RefusePayload(session=join.session, reason=reason, node_id=node_id)
        self.admit(node_id, join)
        return WelcomePayload(session=join.session, node_id=node_id)

    def claim(self, host_id: str, claim: ClaimPayload) -> AssignPayload | RefusePayload:
        """Assign `claim.count` free nodes to the host, or refuse with the reason."""
        if host_id in self.nodes:
            reason = f"host id {host_id!r} is a node id of this run: a host claims under a login of its own"
            return RefusePayload(session=claim.session, reason=reason)
        now = asyncio.get_running_loop().time()
        self._claims = {s: held for s, held in self._claims.items() if held[1] > now and held[0]}
        if claim.session in self._claims:  # the same claim again (a reconnect): the same nodes
            return AssignPayload(session=claim.session, node_ids=self._claims[claim.session][0])
        reserved = {n for nodes, _ in self._claims.values() for n in nodes}
        free = [n for n, state in self.nodes.items() if not state.present and n not in reserved]
        if claim.count > len(free):
            reason = (
                f"host {host_id} claims {claim.count} node(s), {len(free)} are free ({', '.join(free) or 'none'}; "
                f"the run has {len(self.nodes)}): claim at most {len(free)}, or name the nodes with --nodes"
            )
            return RefusePayload(session=claim.session, reason=reason)
        chosen = free[: claim.count]
        self._claims[claim.session] = (chosen, now + CLAIM_HOLD_S)
        log.info("host %s claimed %d node(s): assigned %s", host_id, claim.count, ", ".join(chosen))
        return AssignPayload(session=claim.session, node_ids=chosen)

    def admit(self, node_id: str, join: JoinPayload) -> None:
        for held, _ in self._claims.values():  # joined: no longer reserved (presence holds it now)
            if node_id in held:
                held.remove(node_id)
        state = self.nodes[node_id]
        rejoined = state.session is not None and not state.present
        state.session, state.present, state.host, state.device = join.session, True, join.host, join.device
        state.via = join.via or node_id
        log.info("node %s %s (%s on %s, %s)", node_id, "rejoined" if rejoined else "joined", join.model, join.host, join.device)
        self.changed.set()

    def leave(self, node_id: str, leave: LeavePayload, *, expected: bool) -> bool:
        """Mark the node absent; False for the last will of a session it has already replaced.
        `expected`: the run is closing, so a leave is news, not a warning."""
        state = self.nodes[node_id]
        if leave.session != state.session:
            return False
        state.present = False
        state.left_at = asyncio.get_running_loop().time()
        log.log(logging.INFO if expected else logging.WARNING, "node %s left: %s", node_id, leave.reason or "disconnected")
        self.changed.set()
        return True

    def host_leave(self, host_id: str, leave: LeavePayload, *, expected: bool) -> list[str]:
        """A host's leave (or last will): every node it serves in that session is absent; returns them."""
        gone = [n for n, s in self.nodes.items() if s.via == host_id and s.via != n and s.session == leave.session and s.present]
        now = asyncio.get_running_loop().time()
        for node_id in gone:
            state = self.nodes[node_id]
            state.present, state.left_at = False, now
        if gone:
            level = logging.INFO if expected else logging.WARNING
            log.log(level, "host %s left with node(s) %s: %s", host_id, ", ".join(gone), leave.reason or "disconnected")
            self.changed.set()
        return gone

    def via(self, node_id: str) -> str:
        """Where the node's requests go and its results come from: its own id or its host's."""
        return self.nodes[node_id].via

    def snapshot(self) -> list[NodeSnapshot]:
        return [NodeSnapshot(s.node_id, s.present, s.host, s.device) for s in self.nodes.values()]

    def present(self) -> set[str]:
        return {n for n, state in self.nodes.items() if state.present}

    def last_leave(self) -> float:
        """Loop time of the latest leave of a node still absent (0 when none)."""
        return max((s.left_at for s in self.nodes.values() if not s.present and s.left_at is not None), default=0.0)

    def rejections(self) -> dict[str, dict[str, int]]:
        """What each node reported it dropped, by reason."""
        return {n: dict(state.rejected) for n, state in self.nodes.items()}

    # ------------------------------------------------------------------ waits

    async def wait_changed(self, timeout: float) -> None:
        """Until the next join, leave or result, or `timeout` seconds."""
        self.changed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout)

    def expect_back(self, lost_at: float) -> None:
        """After an outage: the nodes present before it (their wills may have come from the
        broker shutting down, not from them) get REJOIN_GRACE_S to reconnect before a round."""
        since = lost_at - WILLS_BEFORE_OUTAGE_S
        self._expect_back = {
            n for n, state in self.nodes.items() if state.present or (state.left_at is not None and state.left_at >= since)
        }
        self._expect_until = asyncio.get_running_loop().time() + REJOIN_GRACE_S

    async def wait_for_expected(self) -> None:
        """Give the nodes expected back after an outage their grace period."""
        loop = asyncio.get_running_loop()
        while self._expect_back - self.present():
            left = self._expect_until - loop.time()
            if left <= 0:
                break
            await self.wait_changed(left)
        self._expect_back = set()

    async def wait_for_anyone(self, timeout: float) -> bool:
        """With every node gone, wait up to `timeout` s for one to come back; False if none did."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while not self.present():
            left = give_up - loop.time()
            if left <= 0:
                return False
            await self.wait_changed(min(left, 1.0))
        return True
