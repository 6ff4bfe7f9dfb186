"""A volunteer node's incoming messages: checked on arrival, held until the coordinator books them.

A message from an in-neighbour is checked (sender, link, budget, round) and held by
(sender, round sent). Each request lists the keys of the messages the coordinator booked
(from results it accepted) that become readable this round; only those move into the
node's `Inbox`, so a late or forged message cannot change what the node reads. A held
message that is due but was never booked is dropped and counted as unconfirmed; a booked
one that never arrives is counted as missing.

A process that (re)joins a run already under way hears its in-neighbours before its first
request: it holds each one's latest message (the coordinator may book the messages of the
round it joined in for its first round) and does not read, nor warn about, the messages
sent to its node before it was taken back (`expected_unread` counts them).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from collective.distributed.payloads import MessageKey
from collective.distributed.protocol import Rejected, Rejections, Topics, text_digest
from collective.lm.codec import TextCodec
from collective.records import MessageRecord
from collective.run.bus import Inbox, LinkPolicy
from collective.scenario import Scenario

log = logging.getLogger(__name__)

PENDING_PER_KEY = 4  # copies of one (sender, round) message held; more are dropped


@dataclass(eq=False)
class Mailbox:
    """The messages on their way into one node's inbox (see the module docstring)."""

    node_id: str
    scenario: Scenario
    in_neighbours: list[str]
    policies: dict[tuple[str, str], LinkPolicy]  # this node's links, in and out
    codec: TextCodec  # this node's tokenizer
    rejections: Rejections
    topics: Topics
    # a link's token budget counts the sender's tokens: a sender listed here with None has
    # another tokenizer, so only its bytes are checked here (the coordinator counted its
    # tokens before it booked the message, and only booked messages are read)
    sender_codecs: dict[str, TextCodec | None] = field(default_factory=dict)
    missing_messages: int = field(default=0, init=False)
    expected_unread: int = field(default=0, init=False)  # sent to this node before this process was taken back
    due: list[MessageKey] = field(default_factory=list, init=False)  # booked by the requests so far, not yet read
    _pending: dict[tuple[str, int], list[MessageRecord]] = field(default_factory=dict, init=False)
    _before_first_request: set[tuple[str, int]] = field(default_factory=set, init=False)  # keys held then

    def __post_init__(self) -> None:
        self.inbox = Inbox(self.node_id, self.in_neighbours, self.scenario.bus.retain)

    def hold(self, sender: str, record: MessageRecord, now: int) -> None:
        """Check a message that arrived on the link sender -> this node (`now`: the latest round
        requested, -1 before the first request) and hold it; raises `Rejected` when it cannot be
        a message of this run."""
        if record.sender != sender or record.receiver != self.node_id:
            raise Rejected("spoofed", f"a record {record.sender} -> {record.receiver} on the link {sender} -> {self.node_id}")
        try:
            self.scenario.node_index(sender)  # O(1): the scenario keeps its ids by position
        except KeyError:
            raise Rejected("unknown_node", f"{sender!r} is not a node of this run") from None
        if sender not in self.in_neighbours:
            raise Rejected("not_neighbour", f"{sender} -> {self.node_id} is not a link of the topology")
        policy = self.policies[(sender, self.node_id)]
        if record.dropped or record.deliver_round != record.round_sent + policy.latency_rounds:
            raise Rejected("malformed", f"deliver round {record.deliver_round} for a message sent in round {record.round_sent}")
        if now >= 0 and not now - policy.latency_rounds - self.scenario.bus.retain - 2 <= record.round_sent <= now + 1:
            raise Rejected("wrong_round", f"a message of round {record.round_sent}; this node is at round {now}")
        n_bytes = len(record.text.encode("utf-8"))
        codec = self.sender_codecs.get(sender, self.codec)
        n_tokens = 0 if codec is None else len(codec.encode(record.text, add_special_tokens=False))
        if n_bytes > policy.max_message_bytes or n_tokens > policy.max_message_tokens:
            raise Rejected(
                "over_budget",
                f"{n_tokens} tokens / {n_bytes} bytes on a link of {policy.max_message_tokens} / {policy.max_message_bytes}",
            )
        if now < 0:
            if not self._latest_before_first_request(sender, record.round_sent):
                return
            self._before_first_request.add((sender, record.round_sent))
        held = self._pending.setdefault((sender, record.round_sent), [])
        if len(held) < PENDING_PER_KEY and record not in held:
            held.append(record)

    def _latest_before_first_request(self, sender: str, round_sent: int) -> bool:
        """Before its first request this process does not know the run's round: it keeps only
        `sender`'s latest round (older ones were sent before it was taken back: not read)."""
        held = [r for s, r in self._pending if s == sender]
        if any(r > round_sent for r in held):
            self.expected_unread += 1
            return False
        for older in [r for r in held if r < round_sent]:
            self.expected_unread += len(self._pending.pop((sender, older)))
        return True

    async def read_booked(self, round_index: int, grace_s: float) -> None:
        """Move the messages booked for this round into the inbox (each may still be on its
        way for up to `grace_s` seconds); drop what is due and was never booked."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + grace_s
        due, self.due = self.due, []
        for key in due:
            while True:
                found = self._find(key)
                if found is not None or loop.time() >= give_up:
                    break
                await asyncio.sleep(0.01)  # sent before the sender's result, so normally already here
            if found is None:
                self.missing_messages += 1
                log.warning("node %s: the booked message %s@%d never arrived", self.node_id, key.sender, key.round_sent)
                continue
            self.inbox.deliver(found)
            self._pending[(key.sender, key.round_sent)].remove(found)
        self._drop_unbooked(round_index)

    def _drop_unbooked(self, round_index: int) -> None:
        """Whatever is still held and already due was never booked: when it came before this
        process's first request, sent before it was taken back (expected), else late or forged
        (counted as unconfirmed)."""
        for (sender, round_sent), held in list(self._pending.items()):
            if round_sent + self.policies[(sender, self.node_id)].latency_rounds > round_index:
                continue
            del self._pending[(sender, round_sent)]
            if (sender, round_sent) in self._before_first_request:
                self._before_first_request.discard((sender, round_sent))
                self.expected_unread += len(held)
                log.info("node %s: %d message(s) of %s@%d, sent before it was taken back, are not read", self.node_id, len(held), sender, round_sent)
                continue
            for record in held:
                self.rejections.add("unconfirmed", self.topics.message(sender, self.node_id), f"round {record.round_sent}, not booked by the coordinator")

    def _find(self, key: MessageKey) -> MessageRecord | None:
        held = self._pending.get((key.sender, key.round_sent), [])
        return next((record for record in held if text_digest(record.text) == key.digest), None)
