"""A round on volunteer machines from the coordinator's side, and what a result must be to count
(`rounds`, `validation`): no broker, the collector's `send` is a list."""

from __future__ import annotations

import asyncio

import pytest
import torch

from collective.distributed.payloads import (
    JoinPayload,
    PredictionsWire,
    RequestPayload,
    ResultPayload,
)
from collective.distributed.protocol import Rejected, text_digest
from collective.distributed.roster import Roster
from collective.distributed.rounds import RoundCollector
from collective.distributed.validation import ResultCheck
from collective.lm.predictions import TokenPredictions
from collective.run.bus import link_policies, outgoing_messages
from collective.run.node import NodeRoundRequest
from collective.scenario import RelayMessage
from tests.ring_scenario import RING_EDGES, ring_scenario

ROUND_TOKENS, TOP_K = 4, 8
SCENARIO = ring_scenario(top_k=TOP_K)
POLICIES = link_policies(SCENARIO.bus, RING_EDGES)


class Round:
    """A collector over a roster in which a and b joined (c never did), and what it sent."""

    def __init__(self, tokenizer, deadline_s: float = 5.0) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.roster = Roster(SCENARIO, digests={"m": "d" * 24}, vocab_sizes={"m": self.vocab_size})
        for node_id in ("a", "b"):
            self.roster.admit(node_id, self.join(node_id))
        check = ResultCheck(
            top_k=TOP_K, seed=SCENARIO.seed, vocab_sizes=dict.fromkeys(SCENARIO.node_ids, self.vocab_size),
            out_neighbours={"a": ["b"], "b": ["c"], "c": ["a"]}, policies=POLICIES, codec=tokenizer,
        )
        self.sent: list[tuple[str, RequestPayload, int]] = []
        self.targets: list[str] = []  # where each envelope went: a lone node's id or a host's
        self.collector = RoundCollector(self.roster, check, self._send, round_deadline_s=deadline_s)

    def join(self, node_id: str) -> JoinPayload:
        return JoinPayload(session=f"s-{node_id}", model="m", vocab_size=self.vocab_size, tokenizer_digest="d" * 24, device="cpu")

    async def _send(self, target: str, payloads: list[RequestPayload], round_index: int) -> None:
        self.targets.append(target)
        self.sent.extend((payload.node_id, payload, round_index) for payload in payloads)

    def result(self, node_id: str, round_index: int, text: str | None = None) -> ResultPayload:
        gen = torch.Generator().manual_seed(round_index)
        logprobs = torch.log_softmax(torch.randn(1, ROUND_TOKENS, self.vocab_size, generator=gen), dim=-1)  # (1, T, V)
        top_logprobs, top_ids = logprobs.topk(TOP_K, dim=-1)  # (1, T, K)
        wire = PredictionsWire.from_predictions(TokenPredictions(logprobs[..., 0], top_ids, top_logprobs, self.vocab_size))
        receivers = {"a": ["b"], "b": ["c"], "c": ["a"]}[node_id]
        messages = [] if text is None else outgoing_messages(node_id, text, round_index, receivers, POLICIES, self.tokenizer, SCENARIO.seed)
        return ResultPayload(
            session=f"s-{node_id}", collective=wire, isolated=wire, plain=wire, message_text=text, inbox_tokens=0, messages=messages
        )


def _requests(round_index: int) -> list[NodeRoundRequest]:
    ids = torch.arange(ROUND_TOKENS)
    return [
        NodeRoundRequest(
            node_id=node_id, round_index=round_index, control_ids=[], prefix_ids=ids, round_inputs=ids, targets=ids,
            message=RelayMessage(), message_tokens=8, seed=0,
        )
        for node_id in SCENARIO.node_ids
    ]


def test_a_round_asks_only_present_nodes_and_a_silent_one_misses_it_at_the_deadline(tiny_tok):
    async def scenario() -> Round:
        state = Round(tiny_tok, deadline_s=0.3)
        collecting = asyncio.ensure_future(state.collector.collect(0, _requests(0)))
        await asyncio.sleep(0.05)
        assert [(n, r) for n, _, r in state.sent] == [("a", 0), ("b", 0)]  # c never joined
        state.collector.accept("a", 0, state.result("a", 0))
        results = await collecting
        assert results["a"] is not None and results["b"] is None and results["c"] is None
        return state

    state = asyncio.run(scenario())
    assert len(state.collector.round_wall_s) == 1 and state.collector.first_round_wall_s is not None


def test_the_messages_of_an_accepted_result_are_booked_into_their_receivers_next_request(tiny_tok):
    async def scenario() -> RequestPayload:
        state = Round(tiny_tok)
        collecting = asyncio.ensure_future(state.collector.collect(0, _requests(0)))
        await asyncio.sleep(0.05)
        state.collector.accept("a", 0, state.result("a", 0, text="hello b"))
        state.collector.accept("b", 0, state.result("b", 0))
        await collecting
        state.sent.clear()
        collecting = asyncio.ensure_future(state.collector.collect(1, _requests(1)))
        await asyncio.sleep(0.05)
        for node_id in ("a", "b"):
            state.collector.accept(node_id, 1, state.result(node_id, 1))
        await collecting
        return next(payload for node_id, payload, _ in state.sent if node_id == "b")

    to_b = asyncio.run(scenario())
    assert [(k.sender, k.round_sent, k.digest) for k in to_b.inbox] == [("a", 0, text_digest("hello b"))]


def test_a_result_for_another_round_a_forged_message_record_or_a_missing_row_is_rejected(tiny_tok):
    async def scenario() -> list[str]:
        state = Round(tiny_tok)
        collecting = asyncio.ensure_future(state.collector.collect(0, _requests(0)))
        await asyncio.sleep(0.05)
        reasons = []
        honest = state.result("a", 0, text="hi")
        forged_record = honest.messages[0].model_copy(update={"deliver_round": 0})
        for node_id, round_index, result in (
            ("a", 1, state.result("a", 1)),
            ("a", 0, honest.model_copy(update={"messages": [forged_record]})),
            ("a", 0, honest.model_copy(update={"message_text": None})),
            ("a", 0, honest.model_copy(update={"plain": None})),
            ("a", 0, honest.model_copy(update={"session": "an earlier one"})),
            ("c", 0, state.result("c", 0)),
        ):
            with pytest.raises(Rejected) as caught:
                state.collector.accept(node_id, round_index, result)
            reasons.append(caught.value.reason)
        state.collector.accept("a", 0, honest)
        state.collector.accept("a", 0, honest)  # a duplicate after a reconnect: the first one counts
        state.collector.left("b")  # b left: the round does not wait for it
        await collecting
        return reasons

    assert asyncio.run(scenario()) == ["wrong_round", "malformed", "malformed", "malformed", "unexpected", "unexpected"]


def test_a_message_over_its_link_budget_is_named_as_over_budget(tiny_tok):
    state = Round(tiny_tok)
    honest = state.result("a", 0, text="hi")
    long_text = "word " * 40
    bloated = honest.messages[0].model_copy(update={"text": long_text, "n_bytes": len(long_text)})
    with pytest.raises(Rejected) as caught:
        state.collector.check.messages("a", 0, honest.model_copy(update={"messages": [bloated]}))
    assert caught.value.reason == "over_budget"
