"""A round on volunteer machines, from the coordinator's side.

    send each present node only its own request (its view, the keys of the messages it
    must read this round, its fitted firewall), a host's nodes' requests together in one
    envelope to the host (`send` gets the target and its requests) -> collect results until every asked node
    answered or left, or the round's deadline passed -> each result checked (`validation`,
    its screen records too) before it counts -> book the messages the accepted results
    carry (receivers read exactly those next rounds)

A node that does not answer in time is None in the round's results: the evaluation counts
it as missed and the run goes on. A node that (re)joins is asked from the next round on; when
a new process serves it, the messages booked for it before are dropped (`new_process`): they
went to the process before. The deadline is generous for the first round (it
includes every node's warm-up), then ten times the first round's wall time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field

from collective.distributed.mqtt import DistributedError
from collective.distributed.payloads import (
    HostResultPayload,
    MessageKey,
    RequestPayload,
    ResultPayload,
)
from collective.distributed.protocol import Rejected, Rejections, text_digest
from collective.distributed.roster import Roster
from collective.distributed.validation import ResultCheck
from collective.run.node import NodeRoundRequest, NodeRoundResult

log = logging.getLogger(__name__)

FIRST_ROUND_DEADLINE_S = 600.0  # the first round includes every node's warm-up
MIN_ROUND_DEADLINE_S = 30.0
DEADLINE_PER_FIRST_ROUND = 10.0  # later rounds: this many times the first round's wall time

# the target (a lone node's id or a host's), its nodes' requests, the round
SendRequest = Callable[[str, list[RequestPayload], int], Awaitable[object]]


@dataclass(eq=False)
class RoundCollector:
    """One round at a time: requests out, results in, checked and booked (see the module docstring)."""

    roster: Roster
    check: ResultCheck
    send: SendRequest
    _: KW_ONLY
    round_deadline_s: float | None = None  # None: FIRST_ROUND_DEADLINE_S, then a multiple of the first round's wall time
    first_round_deadline_s: float = FIRST_ROUND_DEADLINE_S
    first_round_wall_s: float | None = field(default=None, init=False)
    round_wall_s: list[float] = field(default_factory=list, init=False)  # per round: requests out to the last result in
    round_compute_s: list[float] = field(default_factory=list, init=False)  # per round: the slowest node's own compute
    _round: int | None = field(default=None, init=False)
    _awaiting: set[str] = field(default_factory=set, init=False)
    _results: dict[str, NodeRoundResult] = field(default_factory=dict, init=False)
    _compute_s: dict[str, float] = field(default_factory=dict, init=False)
    _requests: dict[str, RequestPayload] = field(default_factory=dict, init=False)
    _booked: dict[str, list[tuple[int, MessageKey]]] = field(default_factory=dict, init=False)  # receiver -> (round, key)

    def deadline_s(self) -> float:
        if self.round_deadline_s is not None:
            return self.round_deadline_s
        if self.first_round_wall_s is None:
            return self.first_round_deadline_s
        return max(MIN_ROUND_DEADLINE_S, DEADLINE_PER_FIRST_ROUND * self.first_round_wall_s)

    async def collect(self, round_index: int, requests: list[NodeRoundRequest]) -> dict[str, NodeRoundResult | None]:
        """Send the round's requests to the present nodes and wait for their results (or the deadline)."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline_s = self.deadline_s()
        self._open(round_index, requests, deadline_s)
        await self.send_all_again()
        while self._awaiting:
            left = began + deadline_s - loop.time()
            if left <= 0:
                break
            await self.roster.wait_changed(left)
        for node_id in sorted(self._awaiting):
            log.warning("node %s missed the deadline of round %d (%.1f s)", node_id, round_index, deadline_s)
        wall = loop.time() - began
        if self.first_round_wall_s is None and self._results:
            self.first_round_wall_s = wall
        self.round_wall_s.append(wall)
        self.round_compute_s.append(max(self._compute_s.values(), default=0.0))
        results: dict[str, NodeRoundResult | None] = {n: self._results.get(n) for n in self.roster.nodes}
        self._round = None
        self._awaiting = set()
        if not self._results:
            raise DistributedError(
                f"no node answered round {round_index} within its deadline ({deadline_s:g} s); "
                "set a longer one with ?deadline=SECONDS in the --bus URL"
            )
        return results

    def _open(self, round_index: int, requests: list[NodeRoundRequest], deadline_s: float) -> None:
        self._round = round_index
        self._results, self._compute_s, self._requests, self._awaiting = {}, {}, {}, set()
        present = self.roster.present()
        for request in requests:
            node_id = request.node_id
            if node_id not in present:
                continue
            self._requests[node_id] = RequestPayload.from_request(request, self._inbox_keys(node_id, round_index), deadline_s)
            self._awaiting.add(node_id)

    def _inbox_keys(self, receiver: str, round_index: int) -> list[MessageKey]:
        """The booked messages `receiver` reads from this round on (each listed once)."""
        booked = self._booked.get(receiver, [])
        due = [key for deliver_round, key in booked if deliver_round <= round_index]
        self._booked[receiver] = [(d, k) for d, k in booked if d > round_index]
        return due

    async def send_again(self, node_id: str) -> None:
        """Send `node_id` its request of the current round (again: a reconnect may have lost it)."""
        payload = self._requests.get(node_id)
        if payload is not None and self._round is not None and node_id in self._awaiting:
            await self.send(self.roster.via(node_id), [payload], self._round)

    async def send_all_again(self) -> None:
        """Send every node still awaited its request, a host's nodes in one envelope (first, or
        again after a reconnect), concurrently: each QoS 1 publish waits for its acknowledgement."""
        if self._round is None:
            return
        by_target: dict[str, list[RequestPayload]] = {}
        for node_id in sorted(self._awaiting):
            by_target.setdefault(self.roster.via(node_id), []).append(self._requests[node_id])
        await asyncio.gather(*(self.send(target, payloads, self._round) for target, payloads in by_target.items()))

    def left(self, node_id: str) -> None:
        """A node that left is no longer waited for."""
        self._awaiting.discard(node_id)

    def new_process(self, node_id: str) -> int:
        """A new process serves `node_id` from its next request on: the messages booked for the
        node so far went to the one before (this one never heard them) and are not listed to it.
        Returns how many were booked."""
        return len(self._booked.pop(node_id, []))

    def accept_host(self, host_id: str, round_index: int, payload: HostResultPayload, rejections: Rejections, topic: str) -> None:
        """A host's envelope: each node's result is taken or dropped (and counted in `rejections`)
        on its own, with every check of a lone node's result; a node the host does not serve
        is `spoofed`, a node id the run does not have `unknown_node`."""
        message_ids = self.check.message_ids(payload.results)  # the parts' texts encoded together
        for node_id, result in payload.results.items():
            with rejections.dropping(f"{topic} ({node_id})"):
                if node_id not in self.roster.nodes:
                    raise Rejected("unknown_node", f"{host_id}'s envelope carries {node_id!r}, not a node of this scenario")
                self.accept(node_id, round_index, result, via=host_id, message_ids=message_ids.get(node_id))

    def accept(
        self, node_id: str, round_index: int, result: ResultPayload, via: str | None = None, message_ids: list[int] | None = None
    ) -> None:
        """Take a node's result for the current round, which came on `via`'s result topic (its
        own, or in its host's envelope: default its own; `message_ids`: its message text's
        tokens, when the caller encoded them); raises `Rejected` when it cannot count."""
        if via is not None and via != self.roster.via(node_id):
            raise Rejected("spoofed", f"{node_id}'s result from {via!r}; it is served through {self.roster.via(node_id)!r}")
        if self._round is None or round_index != self._round:
            raise Rejected("wrong_round", f"a result for round {round_index}, the current round is {self._round}")
        if node_id in self._results:
            return  # a duplicate after a reconnect: the first one counts
        if node_id not in self._awaiting:
            raise Rejected("unexpected", f"{node_id} was not asked for round {round_index}")
        state = self.roster.nodes[node_id]
        if result.session != state.session:
            raise Rejected("unexpected", f"a result from an earlier session of {node_id}")
        request = self._requests[node_id]
        try:  # a byte-unit round's rows are read at the round's bytes
            decoded = result.to_result(node_id, round_index, request.round_data())
        except ValueError as exc:
            raise Rejected("malformed", f"{node_id}'s rows: {exc}") from None
        self.check.rows(node_id, decoded, request)
        decoded.messages = self.check.messages(node_id, round_index, result, message_ids)
        decoded.screened = self.check.screened(node_id, round_index, result.screened)
        self._results[node_id] = decoded
        self._compute_s[node_id] = result.compute_seconds
        state.rejected, state.missing_messages = dict(result.rejected), result.missing_messages
        for record in decoded.messages:
            if not record.dropped:
                key = MessageKey(sender=node_id, round_sent=round_index, digest=text_digest(record.text))
                self._booked.setdefault(record.receiver, []).append((record.deliver_round, key))
        self._awaiting.discard(node_id)
        self.roster.changed.set()
