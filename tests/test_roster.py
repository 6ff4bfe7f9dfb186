"""Who serves which node, as the coordinator sees it: joins checked, leaves, presence waits (no broker)."""

from __future__ import annotations

import asyncio

from collective.distributed.payloads import (
    AssignPayload,
    ClaimPayload,
    JoinPayload,
    LeavePayload,
    RefusePayload,
)
from collective.distributed.roster import Roster
from tests.ring_scenario import ring_scenario

SCENARIO = ring_scenario()


def _roster() -> Roster:
    return Roster(SCENARIO, digests={"m": "d" * 24}, vocab_sizes={"m": 100})


def _join(session: str, digest: str = "d" * 24, vocab_size: int = 100) -> JoinPayload:
    return JoinPayload(session=session, model="m", vocab_size=vocab_size, tokenizer_digest=digest, device="cpu", host="h1")


def test_a_join_with_a_foreign_tokenizer_or_for_a_node_already_served_is_refused_with_the_reason():
    roster = _roster()
    assert "tokenizer" in (roster.refusal("a", _join("s1", digest="0" * 24)) or "")
    assert "tokenizer" in (roster.refusal("a", _join("s1", vocab_size=99)) or "")
    assert roster.refusal("a", _join("s1")) is None
    roster.admit("a", _join("s1"))
    assert "already served by another process (on h1)" in (roster.refusal("a", _join("s2")) or "")
    assert roster.refusal("a", _join("s1")) is None  # the same process joining again (after a reconnect)
    assert roster.present() == {"a"} and [s.present for s in roster.snapshot()] == [True, False, False]


def test_the_last_will_of_a_replaced_session_does_not_mark_the_node_absent():
    async def scenario() -> None:
        roster = _roster()
        roster.admit("a", _join("s1"))
        roster.leave("a", LeavePayload(session="s1"), expected=False)
        roster.admit("a", _join("s2"))
        assert not roster.leave("a", LeavePayload(session="s1", reason="disconnected"), expected=False)
        assert roster.present() == {"a"}
        assert roster.leave("a", LeavePayload(session="s2"), expected=True) and roster.present() == set()
        assert roster.last_leave() > 0

    asyncio.run(scenario())


def test_with_every_node_gone_a_round_waits_for_one_to_come_back_or_gives_up():
    async def scenario() -> None:
        roster = _roster()
        assert not await roster.wait_for_anyone(0.1)
        asyncio.get_running_loop().call_later(0.1, roster.admit, "b", _join("s1"))
        assert await roster.wait_for_anyone(5)

    asyncio.run(scenario())


def test_after_an_outage_the_nodes_present_before_it_get_a_grace_period_to_come_back(monkeypatch):
    monkeypatch.setattr("collective.distributed.roster.REJOIN_GRACE_S", 5.0)

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        roster = _roster()
        roster.admit("a", _join("s1"))
        roster.leave("a", LeavePayload(session="s1"), expected=False)  # its will, from the broker shutting down
        roster.expect_back(lost_at=loop.time())
        began = loop.time()
        loop.call_later(0.2, roster.admit, "a", _join("s2"))
        await roster.wait_for_expected()
        return loop.time() - began

    assert 0.15 < asyncio.run(scenario()) < 3


def test_a_claim_gets_free_nodes_that_no_other_claim_holds_and_a_claim_for_more_than_are_free_is_refused():
    async def scenario() -> None:
        roster = _roster()
        roster.admit("a", _join("s1"))
        first = roster.claim("h1", ClaimPayload(session="c1", count=1))
        assert isinstance(first, AssignPayload) and first.node_ids == ["b"]
        again = roster.claim("h1", ClaimPayload(session="c1", count=1))  # the same claim after a reconnect
        assert isinstance(again, AssignPayload) and again.node_ids == ["b"]
        greedy = roster.claim("h2", ClaimPayload(session="c2", count=2))
        assert isinstance(greedy, RefusePayload) and "claims 2 node(s), 1 are free (c; the run has 3)" in greedy.reason
        second = roster.claim("h2", ClaimPayload(session="c3", count=1))
        assert isinstance(second, AssignPayload) and second.node_ids == ["c"]
        as_node = roster.claim("a", ClaimPayload(session="c4", count=1))
        assert isinstance(as_node, RefusePayload) and "is a node id of this run" in as_node.reason
        # b joins (reserved no more, held by presence); when its host dies, b is free for a new claim
        roster.admit("b", _join("s2"))
        roster.leave("b", LeavePayload(session="s2"), expected=False)
        third = roster.claim("h3", ClaimPayload(session="c5", count=1))
        assert isinstance(third, AssignPayload) and third.node_ids == ["b"]

    asyncio.run(scenario())
