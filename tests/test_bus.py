"""The text bus: budgets, latency, retention, seeded drops, per-link overrides, inboxes."""

from __future__ import annotations

import networkx as nx
import pytest

from collective.records import MessageRecord
from collective.run.bus import (
    Inbox,
    InMemoryBus,
    enforce_budget,
    is_dropped,
    link_policies,
    message_token_budgets,
    outgoing_messages,
)
from collective.scenario import BusSpec, LinkOverride
from tests.test_scale import CountingCodec

TEXT = "The quick brown fox jumps over the lazy dog, and then the dog sleeps again."


def _count(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def _line(*names: str) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(names)
    for a, b in zip(names, names[1:]):
        graph.add_edge(a, b)
    return graph


def _message(sender: str, receiver: str, round_sent: int, latency: int = 1, text: str = "hi") -> MessageRecord:
    return MessageRecord(
        sender=sender,
        receiver=receiver,
        round_sent=round_sent,
        deliver_round=round_sent + latency,
        text=text,
        n_tokens=1,
        n_bytes=len(text),
    )


# ---------------------------------------------------------------------------- budgets


def test_a_text_within_budget_passes_unchanged(tiny_tok):
    text, n_tokens, n_bytes, truncated = enforce_budget(TEXT, tiny_tok, 1000, 1000)
    assert (text, n_tokens, n_bytes, truncated) == (TEXT, _count(tiny_tok, TEXT), len(TEXT.encode()), False)


@pytest.mark.parametrize("max_tokens", [0, 1, 3, 7])
def test_the_token_budget_keeps_the_first_tokens(tiny_tok, max_tokens):
    ids = tiny_tok.encode(TEXT, add_special_tokens=False)
    text, n_tokens, _, truncated = enforce_budget(TEXT, tiny_tok, max_tokens, 1000)
    assert truncated
    assert text == tiny_tok.decode(ids[:max_tokens])
    assert n_tokens == _count(tiny_tok, text) <= max_tokens


def test_the_byte_budget_cuts_multibyte_text_at_a_character_boundary(tiny_tok):
    # each "é" is two UTF-8 bytes: 5 bytes hold two of them, never half of the third
    text, _, n_bytes, truncated = enforce_budget("é" * 5, tiny_tok, 100, 5)
    assert (text, n_bytes, truncated) == ("éé", 4, True)
    text, _, n_bytes, _ = enforce_budget("aé€", tiny_tok, 100, 5)  # 1 + 2 + 3 bytes
    assert (text, n_bytes) == ("aé", 3)


@pytest.mark.parametrize("max_tokens", range(1, 16))
def test_the_token_budget_never_splits_a_character_nor_overflows(tiny_tok, max_tokens):
    # CJK characters are several byte-level tokens each in the tiny tokenizer: a cut between
    # them must drop the partial character, not send a replacement character
    original = "日本語です"
    text, n_tokens, n_bytes, _ = enforce_budget(original, tiny_tok, max_tokens, 1000)
    assert "\ufffd" not in text
    assert original.startswith(text)
    assert n_tokens == _count(tiny_tok, text) <= max_tokens
    assert n_bytes == len(text.encode("utf-8"))


def test_both_budgets_hold_at_once(tiny_tok):
    for max_tokens in range(0, 12):
        for max_bytes in range(0, 30, 3):
            text, n_tokens, n_bytes, _ = enforce_budget("héllo wörld ünïcode 日本 text", tiny_tok, max_tokens, max_bytes)
            assert n_tokens <= max_tokens and n_bytes <= max_bytes
            assert "héllo wörld ünïcode 日本 text".startswith(text)


# ---------------------------------------------------------------------------- links


def test_per_link_overrides_change_only_their_link():
    bus = BusSpec(
        max_message_tokens=24,
        max_message_bytes=160,
        latency_rounds=1,
        drop_rate=0.0,
        links=[LinkOverride(source="a", target="b", max_message_tokens=3, latency_rounds=4, drop_rate=1.0)],
    )
    policies = link_policies(bus, [("a", "b"), ("b", "a")])
    assert (policies[("a", "b")].max_message_tokens, policies[("a", "b")].latency_rounds) == (3, 4)
    assert policies[("a", "b")].drop_rate == 1.0
    assert policies[("a", "b")].max_message_bytes == 160  # not overridden: the bus default
    assert (policies[("b", "a")].max_message_tokens, policies[("b", "a")].latency_rounds) == (24, 1)
    assert policies[("b", "a")].drop_rate == 0.0


def test_a_per_link_budget_and_latency_apply_on_the_bus(tiny_tok):
    graph = nx.DiGraph([("a", "b"), ("a", "c")])
    spec = BusSpec(links=[LinkOverride(source="a", target="b", max_message_tokens=2, latency_rounds=3)])
    bus = InMemoryBus(graph, spec, tiny_tok, seed=0)
    to_b, to_c = bus.send("a", "hello there", 0)
    assert to_b.n_tokens <= 2 and to_b.truncated and to_b.deliver_round == 3
    assert to_c.text == "hello there" and not to_c.truncated and to_c.deliver_round == 1


def test_a_senders_budget_is_its_tightest_out_link_and_the_default_without_one():
    graph = nx.DiGraph([("a", "b"), ("a", "c"), ("b", "a")])
    graph.add_node("d")  # no out-link
    spec = BusSpec(max_message_tokens=24, links=[
        LinkOverride(source="a", target="c", max_message_tokens=5),
        LinkOverride(source="b", target="a", latency_rounds=2),  # no token budget of its own
        LinkOverride(source="c", target="a", max_message_tokens=1),  # not an edge of the graph
    ])
    assert message_token_budgets(spec, graph) == {"a": 5, "b": 24, "c": 24, "d": 24}


# ---------------------------------------------------------------------------- latency, retention


@pytest.mark.parametrize("latency", [1, 2, 5])
def test_a_message_is_read_exactly_latency_rounds_after_it_is_sent(tiny_tok, latency):
    bus = InMemoryBus(_line("a", "b"), BusSpec(latency_rounds=latency), tiny_tok, seed=0)
    bus.send("a", "hello", 3)
    for round_index in range(3, 3 + latency):
        assert bus.render_inbox("b", round_index) == ""
    assert bus.render_inbox("b", 3 + latency) == "a: hello\n"
    assert bus.render_inbox("a", 3 + latency) == ""  # the edge is directed


@pytest.mark.parametrize("latency", [1, 9, 12, 30])
def test_a_long_latency_delays_every_message_without_losing_any(tiny_tok, latency):
    bus = InMemoryBus(_line("a", "b"), BusSpec(latency_rounds=latency, retain=1), tiny_tok, seed=0)
    seen = []
    for round_index in range(latency + 10):
        seen.append(bus.render_inbox("b", round_index))
        bus.send("a", f"m{round_index}", round_index)
    assert seen[:latency] == [""] * latency
    assert seen[latency:] == [f"a: m{r}\n" for r in range(10)]


def test_the_inbox_keeps_the_last_retain_messages_per_neighbour(tiny_tok):
    graph = nx.DiGraph([("a", "c"), ("b", "c")])
    bus = InMemoryBus(graph, BusSpec(retain=2, inbox_template="{sender}@{round}:{text};"), tiny_tok, seed=0)
    shown = []
    for round_index in range(5):
        shown.append([(m.sender, m.round_sent) for m in bus.inboxes["c"].visible(round_index)])
        bus.send("a", f"x{round_index}", round_index)
        if round_index == 0:
            bus.send("b", "only", round_index)
    assert shown == [[], [("a", 0), ("b", 0)], [("a", 0), ("a", 1), ("b", 0)], [("a", 1), ("a", 2), ("b", 0)],
                     [("a", 2), ("a", 3), ("b", 0)]]
    assert bus.render_inbox("c", 5) == "a@3:x3;a@4:x4;b@0:only;"


def test_the_inbox_renders_neighbours_in_order_with_header_and_template():
    inbox = Inbox("c", ["b", "a"], retain=1)
    inbox.deliver(_message("a", "c", 0, text="from a"))
    inbox.deliver(_message("b", "c", 0, text="from b"))
    assert inbox.render(1, "[{sender} r{round}] {text}\n", header="Inbox:\n") == "Inbox:\n[b r0] from b\n[a r0] from a\n"
    assert inbox.render(0, "{text}", header="Inbox:\n") == ""  # nothing visible: no header either


def test_the_inbox_refuses_a_message_from_a_non_neighbour():
    inbox = Inbox("c", ["a"], retain=1)
    with pytest.raises(ValueError, match="not a link into c"):
        inbox.deliver(_message("b", "c", 0))
    with pytest.raises(ValueError):
        inbox.deliver(_message("a", "d", 0))


# ---------------------------------------------------------------------------- drops


def test_drop_rate_zero_delivers_everything_and_one_delivers_nothing(tiny_tok):
    graph = nx.DiGraph([("a", "b"), ("a", "c")])
    spec = BusSpec(links=[LinkOverride(source="a", target="c", drop_rate=1.0)])
    bus = InMemoryBus(graph, spec, tiny_tok, seed=0)
    records = [r for round_index in range(50) for r in bus.send("a", "hi", round_index)]
    assert not any(r.dropped for r in records if r.receiver == "b")
    assert all(r.dropped for r in records if r.receiver == "c")
    assert bus.render_inbox("b", 50) == "a: hi\n"
    assert bus.render_inbox("c", 50) == ""


def _drops(seed: int, rate: float = 0.5, rounds: int = 200) -> list[bool]:
    return [is_dropped(seed, "a", "b", r, rate) for r in range(rounds)]


def test_drops_are_seeded_per_link_and_round():
    assert _drops(7) == _drops(7)
    assert _drops(7) != _drops(8)
    assert _drops(7) != [is_dropped(7, "b", "a", r, 0.5) for r in range(200)]  # each link its own draws
    assert 0.35 < sum(_drops(7)) / 200 < 0.65


def test_a_dropped_message_never_reaches_the_inbox(tiny_tok):
    bus = InMemoryBus(_line("a", "b"), BusSpec(drop_rate=0.5), tiny_tok, seed=3)
    for round_index in range(40):
        (record,) = bus.send("a", f"m{round_index}", round_index)
        shown = bus.render_inbox("b", round_index + 1)
        if record.dropped:
            assert f"m{round_index}\n" not in shown
        else:
            assert shown == f"a: m{round_index}\n"


@pytest.mark.parametrize("text", ["hi", TEXT * 4])
def test_a_broadcast_encodes_its_text_once_for_all_links_and_cuts_it_once_per_budget(tiny_tok, text):
    """Four out-links, three of one budget and one tighter: each record is the text cut to its
    link's budget, with one tokenizer call for the text and, per distinct budget, only the
    calls that re-measure its cut."""
    receivers = ["b", "c", "d", "e"]
    bus = BusSpec(max_message_tokens=12, max_message_bytes=64, links=[LinkOverride(source="a", target="e", max_message_tokens=5)])
    policies = link_policies(bus, [("a", r) for r in receivers])
    codec = CountingCodec(tiny_tok)
    records = outgoing_messages("a", text, 3, receivers, policies, codec, 0)
    remeasured = 0
    for budget in {(p.max_message_tokens, p.max_message_bytes) for p in policies.values()}:
        alone = CountingCodec(tiny_tok)
        enforce_budget(text, alone, *budget)
        remeasured += alone.encoded - 1  # its first call encodes the whole text
    for record in records:
        policy = policies[("a", record.receiver)]
        cut, n_tokens, n_bytes, truncated = enforce_budget(text, tiny_tok, policy.max_message_tokens, policy.max_message_bytes)
        assert (record.text, record.n_tokens, record.n_bytes, record.truncated) == (cut, n_tokens, n_bytes, truncated)
    assert records[0].text == records[1].text == records[2].text
    assert records[3].truncated == (text != "hi") == (remeasured > 0)
    assert codec.encoded == 1 + remeasured


def test_two_budgets_that_cut_a_message_to_the_same_text_encode_that_cut_once(tiny_tok):
    """Two links of 5 tokens, one of 64 bytes and one of 200: the token cut binds on both, so
    both carry the same cut, and the broadcast encodes the message once and that cut once (the
    two budgets' cuts measured separately would encode it twice)."""
    receivers = ["b", "c"]
    bus = BusSpec(max_message_tokens=5, max_message_bytes=64, links=[LinkOverride(source="a", target="c", max_message_bytes=200)])
    policies = link_policies(bus, [("a", r) for r in receivers])
    codec = CountingCodec(tiny_tok)
    records = outgoing_messages("a", TEXT * 4, 3, receivers, policies, codec, 0)
    assert records[0].text == records[1].text and records[0].truncated and records[0].n_tokens <= 5
    assert (records[0].text, records[0].n_tokens, records[0].n_bytes) == enforce_budget(TEXT * 4, tiny_tok, 5, 64)[:3]
    assert codec.encoded == 2
    ids = tiny_tok.encode(TEXT * 4, add_special_tokens=False)
    again = CountingCodec(tiny_tok)
    assert outgoing_messages("a", TEXT * 4, 3, receivers, policies, again, 0, ids=ids) == records
    assert again.encoded == 1  # the caller's tokens of the message: only the cut is encoded
