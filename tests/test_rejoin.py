"""A node served by a new process mid-run (no broker): taken back at the next round after its
join, it reads what was booked for it after the join, and the messages sent to it before are
expected losses, neither warnings nor missing messages."""

from __future__ import annotations

import asyncio

from collective.distributed.mailbox import Mailbox
from collective.distributed.payloads import MessageKey, RequestPayload
from collective.distributed.protocol import Rejections, Topics, text_digest
from collective.records import MessageRecord
from collective.run.bus import link_policies
from tests.ring_scenario import ring_scenario
from tests.test_rounds import Round, _requests

SCENARIO = ring_scenario()


def _mailbox(tokenizer) -> Mailbox:
    """Node b of the ring a -> b -> c -> a: it hears a only."""
    policies = link_policies(SCENARIO.bus, [("a", "b"), ("b", "c")])
    return Mailbox("b", SCENARIO, ["a"], policies, tokenizer, Rejections("node b"), Topics("r1"))


def _record(text: str, round_sent: int) -> MessageRecord:
    return MessageRecord(
        sender="a", receiver="b", round_sent=round_sent, deliver_round=round_sent + 1, text=text, n_tokens=1, n_bytes=len(text)
    )


def _key(text: str, round_sent: int) -> MessageKey:
    return MessageKey(sender="a", round_sent=round_sent, digest=text_digest(text))


def test_before_its_first_request_a_new_process_keeps_each_senders_latest_message_and_reads_it_once_booked(tiny_tok):
    mailbox = _mailbox(tiny_tok)
    for round_sent in (8, 10, 9):  # the run is at round 10; this process does not know it yet
        mailbox.hold("a", _record(f"round {round_sent}", round_sent), now=-1)
    mailbox.due = [_key("round 10", 10)]  # its first request (round 11) lists what was booked after its join
    asyncio.run(mailbox.read_booked(11, grace_s=0.05))
    assert [m.text for m in mailbox.inbox.visible(11)] == ["round 10"]
    assert mailbox.rejections.as_dict() == {} and mailbox.missing_messages == 0
    assert mailbox.expected_unread == 2  # rounds 8 and 9: sent before it was taken back


def test_a_message_sent_before_the_join_and_never_booked_is_expected_but_later_ones_still_count(tiny_tok):
    mailbox = _mailbox(tiny_tok)
    mailbox.hold("a", _record("early", 10), now=-1)
    asyncio.run(mailbox.read_booked(11, grace_s=0.05))  # its first round: nothing was booked for it
    assert mailbox.rejections.as_dict() == {} and mailbox.expected_unread == 1
    mailbox.hold("a", _record("late", 11), now=11)
    asyncio.run(mailbox.read_booked(12, grace_s=0.05))  # from its first round on, the usual rules
    assert mailbox.rejections.as_dict() == {"unconfirmed": 1} and mailbox.expected_unread == 1


def test_a_new_process_is_asked_at_the_next_round_with_only_what_was_booked_after_it_joined(tiny_tok):
    async def scenario() -> list[tuple[str, RequestPayload, int]]:
        state = Round(tiny_tok)  # a and b joined; c never did
        for round_index, text in ((0, "to b, before"), (1, "to b, after")):
            if round_index == 1:  # b's process is replaced between the rounds
                assert state.collector.new_process("b") == 1  # a's message of round 0, booked for b
            collecting = asyncio.ensure_future(state.collector.collect(round_index, _requests(round_index)))
            await asyncio.sleep(0.05)
            state.collector.accept("a", round_index, state.result("a", round_index, text=text))
            state.collector.accept("b", round_index, state.result("b", round_index))
            await collecting
        state.sent.clear()
        collecting = asyncio.ensure_future(state.collector.collect(2, _requests(2)))
        await asyncio.sleep(0.05)
        state.collector.left("a")
        state.collector.left("b")
        await asyncio.gather(collecting, return_exceptions=True)  # nobody answered round 2: an error, not ours
        return state.sent

    sent = asyncio.run(scenario())
    to_b = next(payload for node_id, payload, round_index in sent if node_id == "b" and round_index == 2)
    assert [(k.sender, k.round_sent, k.digest) for k in to_b.inbox] == [("a", 1, text_digest("to b, after"))]
