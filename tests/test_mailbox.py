"""A volunteer node's incoming messages: checked on arrival, read only once booked (no broker)."""

from __future__ import annotations

import asyncio

import pytest

from collective.distributed.mailbox import Mailbox
from collective.distributed.payloads import MessageKey
from collective.distributed.protocol import Rejected, Rejections, Topics, text_digest
from collective.records import MessageRecord
from collective.run.bus import link_policies
from tests.ring_scenario import ring_scenario

SCENARIO = ring_scenario()


def _mailbox(tokenizer) -> Mailbox:
    """Node b of the ring a -> b -> c -> a: it hears a only."""
    policies = link_policies(SCENARIO.bus, [("a", "b"), ("b", "c")])
    return Mailbox("b", SCENARIO, ["a"], policies, tokenizer, Rejections("node b"), Topics("r1"))


def _record(text: str, sender: str = "a", round_sent: int = 0, **changes) -> MessageRecord:
    fields = {"sender": sender, "receiver": "b", "round_sent": round_sent, "deliver_round": round_sent + 1, "text": text,
              "n_tokens": 1, "n_bytes": len(text.encode())}
    return MessageRecord(**{**fields, **changes})


@pytest.mark.parametrize(
    ("sender", "record", "now", "reason"),
    [
        ("a", _record("hi", sender="c"), 0, "spoofed"),
        ("zz", _record("hi", sender="zz"), 0, "unknown_node"),
        ("c", _record("hi", sender="c"), 0, "not_neighbour"),
        ("a", _record("hi", deliver_round=5), 0, "malformed"),
        ("a", _record("hi", round_sent=50), 0, "wrong_round"),
        ("a", _record("word " * 40), 0, "over_budget"),
    ],
)
def test_a_message_that_cannot_be_one_of_this_run_is_rejected_on_arrival(tiny_tok, sender, record, now, reason):
    with pytest.raises(Rejected) as caught:
        _mailbox(tiny_tok).hold(sender, record, now)
    assert caught.value.reason == reason


def test_only_booked_messages_reach_the_inbox_and_what_is_missing_or_unbooked_is_counted(tiny_tok):
    mailbox = _mailbox(tiny_tok)
    mailbox.hold("a", _record("booked"), now=0)
    mailbox.hold("a", _record("forged"), now=0)
    mailbox.due = [
        MessageKey(sender="a", round_sent=0, digest=text_digest("booked")),
        MessageKey(sender="a", round_sent=0, digest=text_digest("never sent")),
    ]
    asyncio.run(mailbox.read_booked(1, grace_s=0.05))
    assert [m.text for m in mailbox.inbox.visible(1)] == ["booked"]
    assert mailbox.missing_messages == 1 and mailbox.rejections.as_dict() == {"unconfirmed": 1}
