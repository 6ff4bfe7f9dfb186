"""Receiver-side firewalls (`firewall:`): each filter does what its docstring says, in order;
the perplexity filter is fitted on the train part only, drops searched gibberish and passes
fluent text at its fitted false-drop rate; a run with a firewall records what it did in the
events and the report, in one batched pass per model filter."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import collective.run.firewall as firewall_module
from collective.lm.codec import start_token
from collective.lm.models import LoadedModel, ModelPool
from collective.records import REPORT_SCHEMA_VERSION, MessageRecord, Report, RoundEvent
from collective.report.report_view import report_markdown
from collective.run.firewall import (
    InboxRead,
    allowed_characters,
    message_nll,
    message_score,
    read_inboxes,
    retokenized_ids,
    screen,
)
from collective.run.firewall_fit import benign_messages, distinct_starts, fit_firewalls
from collective.run.node import NodeRoundRequest, compute_rounds
from collective.run.observation import Observer
from collective.run.prepared import build_graph, placeholder_ids_for
from collective.run.runner import prepare, run_prepared
from collective.scenario import (
    CharsetFilter,
    LaggedView,
    ParaphraseFilter,
    PerplexityFilter,
    RelayMessage,
    RetokenizeFilter,
    Scenario,
    ScenarioError,
    SilentMessage,
    WindowView,
    load_scenario,
    parse_scenario,
)
from collective.seeding import generator
from controllers.messages import MessagePart, MessageSearchConfig, MessageTask, search_messages
from tests.test_rundir import write_tiny_scenario
from tests.tiny import pydoc_text, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = 8000  # tokens of the train part, and of the text the fluent model learns
BUDGET = 12  # the links' token budget: benign messages are this long
TEMPLATE = "{sender}: {text}\n"


@pytest.fixture(scope="module")
def stream(tiny_tok) -> torch.Tensor:
    return torch.tensor(tiny_tok.encode(pydoc_text()[:60_000], add_special_tokens=False)[: TRAIN + 64])


@pytest.fixture(scope="module")
def fluent(tiny_tok, stream) -> LoadedModel:
    """A tiny Llama trained for a few seconds on the train part: fluent text is far likelier to
    it than gibberish (a random-initialised model cannot tell them apart)."""
    model = tiny_llama(len(tiny_tok), seed=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        starts = torch.randint(0, TRAIN - 33, (16,), generator=gen).tolist()
        batch = torch.stack([stream[s : s + 33] for s in starts])  # (16, 33)
        logits = model(input_ids=batch[:, :-1]).logits  # (16, 32, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().requires_grad_(False)
    return LoadedModel.in_memory(model, tiny_tok, "tiny")


def fw_scenario(firewall: list[dict[str, Any]], *, train: int = TRAIN, budget: int = BUDGET) -> Scenario:
    return parse_scenario(
        {
            "name": "firewall",
            "seed": 5,
            "models": {"tiny": {"ref": "tiny"}},
            "corpus": {"train_tokens": train, "eval_tokens": 64},
            "node_defaults": {"model": "tiny", "message": {"policy": "relay"}, "firewall": firewall},
            "nodes": [{"id": "a"}, {"id": "b"}, {"id": "c"}],
            "topology": {"kind": "ring", "directed": True},
            "bus": {"round_tokens": 8, "max_message_tokens": budget, "max_message_bytes": 400},
            "evaluation": {"context_tokens": 32},
        },
        source="firewall.yaml",
    )


def message(text: str, sender: str = "a", receiver: str = "b", round_sent: int = 3) -> MessageRecord:
    return MessageRecord(
        sender=sender, receiver=receiver, round_sent=round_sent, deliver_round=round_sent + 1, text=text,
        n_tokens=0, n_bytes=len(text.encode()),
    )


def read(filters, *texts: str, receiver: str = "b", senders: str = "axyz") -> InboxRead:
    messages = tuple(message(t, senders[i % len(senders)], receiver) for i, t in enumerate(texts))
    return InboxRead(receiver, 5, messages, tuple(filters), TEMPLATE, "")


def screened(model, tok, filters, *texts: str):
    (items,) = screen(model, tok, [read(filters, *texts)], batch_tokens=4096)
    return items


# ---------------------------------------------------------------------------- perplexity


def _searched_gibberish(lm: LoadedModel, stream: torch.Tensor, count: int = 4) -> list[str]:
    """Messages searched (from the relay) to raise a reader's NLL of the next tokens: the
    reader's part of the message search with a negative weight."""
    tok = lm.tokenizer
    start = start_token(tok)
    tasks = []
    for k in range(count):
        at = 1000 + 1500 * k
        span = stream[at : at + 8].tolist()
        part = MessagePart(
            prefix_ids=[start, *tok.encode("a: ", add_special_tokens=False)],
            rest_ids=[*tok.encode("\n", add_special_tokens=False), *stream[at - 20 : at].tolist(), *span],
            labels=span, weight=-1.0, max_nll=12.0,
        )
        tasks.append(MessageTask(parts=[part], init_ids=stream[at - BUDGET : at].tolist(), seed=k))
    config = MessageSearchConfig(steps=6, search_width=32, topk=32, n_replace=2)
    return [found.text for found in search_messages(lm.model, tok, tasks, config)]


def _scores(lm: LoadedModel, messages: list[MessageRecord]) -> list[float]:
    """Each message's whole-message score, recomputed here one by one."""
    ids = [lm.tokenizer.encode(m.text, add_special_tokens=False) for m in messages]
    return [message_score(values, None) for values in message_nll(lm.model, lm.tokenizer, ids, batch_tokens=4096)]


def test_the_threshold_is_the_fit_halfs_quantile_and_its_drop_rate_is_measured_on_the_held_out_half(fluent, stream):
    # 256 fitted and 256 held out: with the default 64 the held-out rate's own sampling error is about +-0.04
    sc = fw_scenario([{"kind": "perplexity", "false_drop_rate": 0.1, "fit_messages": 256}])
    graph = build_graph(sc)
    fitted = fit_firewalls(sc, {"tiny": fluent}, graph, stream)
    (spec,) = fitted.filters["b"]
    assert isinstance(spec, PerplexityFilter) and spec.threshold is not None
    fit = fitted.fits["b"][0]
    train = Observer(stream[:TRAIN], sc.nodes, seed=sc.seed, round_tokens=8, context_tokens=32, placeholder_ids={})
    sample = benign_messages(sc, graph, train, fluent.tokenizer, "b", 0)
    assert (fit.benign_messages, fit.held_out_messages, fit.requested_messages) == (256, 256, 256)
    assert fit.windows_available == sample.windows_available > 512
    fit_scores, held_scores = sorted(_scores(fluent, sample.fit)), _scores(fluent, sample.held_out)
    assert spec.threshold == pytest.approx(fit_scores[math.ceil(0.9 * 256) - 1], abs=1e-4)  # by hand: the 231st of 256
    held_rate = sum(score > spec.threshold for score in held_scores) / 256
    assert fit.held_out_drop_rate == pytest.approx(held_rate, abs=1.5 / 256)  # one tie at the threshold either way
    assert 0.03 <= fit.held_out_drop_rate <= 0.25  # near the fitted 10% on text the fit did not see (17% here)

    used = {m.text for m in [*sample.fit, *sample.held_out]}
    windows = [fluent.tokenizer.decode(stream[at : at + BUDGET].tolist()) for at in range(4, TRAIN - BUDGET, BUDGET)]
    fluent_texts = [text for text in windows if text not in used]  # train-part windows neither half used
    assert len(fluent_texts) > 100
    passed = screened(fluent.model, fluent.tokenizer, [spec], *fluent_texts)
    dropped = sum(s.dropped_by == "perplexity" for s in passed) / len(passed)
    assert 0.03 <= dropped <= 0.2  # about the fitted 10%

    gibberish = screened(fluent.model, fluent.tokenizer, [spec], *_searched_gibberish(fluent, stream))
    assert [s.dropped_by for s in gibberish] == ["perplexity"] * 4
    assert all(s.score is not None and s.score > spec.threshold and s.threshold == spec.threshold for s in gibberish)


def _relay_positions(view: Any, at: int, tokens: int, round_tokens: int = 8, context_tokens: int = 64) -> list[int]:
    """By hand: the last `tokens` positions of [the view's span][the round]."""
    lo, hi = view.span(at, context_tokens)
    return [*range(lo, hi), *range(at, at + round_tokens)][-tokens:]


def test_the_fit_rounds_relay_distinct_full_length_non_overlapping_windows_of_the_train_part():
    window, lagged, short = WindowView(tokens=16), LaggedView(tokens=32, lag=16), WindowView(tokens=4)
    links = [(window, 12), (lagged, 32)]
    starts = distinct_starts(links, 400, 8, 64)
    # the lagged relay reads [at-40, at-16) and [at, at+8): full from at = 40, then every 48 tokens
    assert starts == list(range(40, 393, 48))
    # each round is one message, over one of the links: what any link would relay at one round
    # reads no position another round's could
    reads = [set().union(*(_relay_positions(view, at, tokens) for view, tokens in links)) for at in starts]
    assert all(len(_relay_positions(view, at, tokens)) == tokens for at in starts for view, tokens in links)
    assert all(0 <= p < 400 for read in reads for p in read)
    assert sum(map(len, reads)) == len(set().union(*reads))  # no position read by two rounds
    # a view shorter than the budget: full length is what it ever relays (4 + the round's 8)
    assert distinct_starts([(short, 32)], 100, 8, 64) == list(range(4, 93, 12))
    assert distinct_starts([(window, 12)], 7, 8, 64) == []  # not one round in the train part


def test_the_fit_uses_each_window_once_and_holds_out_half_of_what_there_is(tiny_tok, stream, caplog):
    sc = fw_scenario([{"kind": "perplexity", "fit_messages": 32}])
    graph = build_graph(sc)
    train = Observer(stream[:TRAIN], sc.nodes, seed=sc.seed, round_tokens=8, context_tokens=32, placeholder_ids={})
    sample = benign_messages(sc, graph, train, tiny_tok, "b", 0)
    assert len(sample.fit) == len(sample.held_out) == 32
    rounds = [m.round_sent for m in [*sample.fit, *sample.held_out]]
    assert sorted(rounds, reverse=True) == list(range(-1, -65, -1))  # one round each, none shared
    assert len({m.text for m in [*sample.fit, *sample.held_out]}) == 64  # distinct windows, distinct text
    short = fw_scenario([{"kind": "perplexity", "fit_messages": 32}], train=100)
    small = Observer(stream[:100], short.nodes, seed=short.seed, round_tokens=8, context_tokens=32, placeholder_ids={})
    with caplog.at_level("WARNING"):
        few = benign_messages(short, build_graph(short), small, tiny_tok, "b", 0)
    assert few.windows_available == len(distinct_starts([(short.node("a").view, BUDGET)], 100, 8, 32)) == 8
    assert (len(few.fit), len(few.held_out)) == (4, 4) and "fewer than the 64 asked for" in caplog.text


def test_a_message_score_is_its_mean_nll_or_its_worst_window():
    nll = torch.tensor([1.0, 1.0, 7.0, 5.0, 1.0])
    assert message_score(nll, None) == pytest.approx(3.0)
    assert message_score(nll, 2) == pytest.approx(6.0)  # the window (7, 5)
    assert message_score(nll, 8) == pytest.approx(3.0)  # shorter than the window: the whole message
    assert message_score(torch.zeros(0), 2) == 0.0


def test_message_nll_is_each_message_scored_alone_from_the_start_token(tiny_lm, tiny_tok):
    texts = ["def f(x): return x", "a", "the quick brown fox jumps"]
    ids = [tiny_tok.encode(t, add_special_tokens=False) for t in texts]
    together = message_nll(tiny_lm, tiny_tok, ids, batch_tokens=4096)
    for row, values in zip(ids, together):
        full = torch.tensor([[start_token(tiny_tok), *row]])
        logprobs = torch.log_softmax(tiny_lm(input_ids=full).logits[0, :-1].float(), -1)  # (n, V)
        alone = -logprobs[torch.arange(len(row)), torch.tensor(row)]
        torch.testing.assert_close(values, alone, rtol=1e-4, atol=1e-4)


def test_every_message_of_every_receiver_is_scored_in_one_pass_each_distinct_one_once(tiny_lm, tiny_tok, monkeypatch):
    calls: list[int] = []
    real = firewall_module.score_items

    def counting(model, items, **kwargs):
        calls.append(len(items))
        return real(model, items, **kwargs)

    monkeypatch.setattr(firewall_module, "score_items", counting)
    filters = [CharsetFilter(action="strip"), PerplexityFilter(threshold=50.0)]
    reads = [read(filters, f"one {r}", "two words", receiver=r) for r in "bcd"]
    out = read_inboxes(tiny_lm, tiny_tok, reads, batch_tokens=4096)
    assert calls == [4]  # one row per distinct message: "two words" was broadcast to all three
    assert all(len(inbox.screened) == 2 and all(s.score is not None for s in inbox.screened) for inbox in out)


def test_fitting_reads_the_train_part_only(tiny_lm, tiny_tok, stream):
    sc = fw_scenario([{"kind": "perplexity", "fit_messages": 16}, {"kind": "perplexity", "window": 4, "fit_messages": 16}], train=400)
    graph = build_graph(sc)
    models = {"tiny": LoadedModel.in_memory(tiny_lm, tiny_tok, "tiny")}
    base = stream[:464].clone()
    other_eval = base.clone()
    other_eval[400:] = torch.randint(1, len(tiny_tok), (64,), generator=torch.Generator().manual_seed(1))
    other_train = base.clone()
    other_train[:400] = stream[1000:1400]

    def thresholds(tokens: torch.Tensor) -> list[float | None]:
        return [f.threshold for f in fit_firewalls(sc, models, graph, tokens).filters["a"]]  # type: ignore[union-attr]

    fitted = thresholds(base)
    assert all(t is not None and t > 0 for t in fitted)
    assert fitted[1] > fitted[0]  # fitted on the windowed score: the worst 4-token window of each message
    assert thresholds(other_eval) == fitted
    assert thresholds(base[:400]) == fitted  # the eval part is never read, not even its length
    changed = thresholds(other_train)
    assert changed[0] != fitted[0] and changed[1] != fitted[1]


def test_a_filter_that_cannot_be_fitted_names_its_field(tiny_lm, tiny_tok, stream):
    sc = fw_scenario([{"kind": "perplexity"}], train=48, budget=64)
    with pytest.raises(ValueError, match=r"nodes\.a\.firewall\[0\] \(perplexity\).*64 tokens.*corpus\.train_tokens is 48"):
        fit_firewalls(sc, {"tiny": LoadedModel.in_memory(tiny_lm, tiny_tok, "tiny")}, build_graph(sc), stream)
    strict = fw_scenario([{"kind": "charset", "allow": "ascii"}, {"kind": "perplexity"}], train=400, budget=4)
    nothing = torch.full((464,), tiny_tok.encode("é", add_special_tokens=False)[0])  # no benign message is ASCII
    with pytest.raises(ValueError, match=r"nodes\.a\.firewall\[1\].*dropped every benign"):
        fit_firewalls(strict, {"tiny": LoadedModel.in_memory(tiny_lm, tiny_tok, "tiny")}, build_graph(strict), nothing)


def test_a_threshold_that_is_not_positive_is_refused_naming_the_field():
    for value in (0, -2.5):
        with pytest.raises(ScenarioError, match=r"node_defaults\.firewall\[0\]\.threshold.*above 0"):
            fw_scenario([{"kind": "perplexity", "threshold": value}])


# ---------------------------------------------------------------------------- the text filters


def test_charset_sets_are_printable_ascii_and_latin():
    text = "a\tb\n\x7f\u00e9\u00a0\u0153\u0180\u4e2d"
    assert allowed_characters(text, "printable") == "a\tb\n"
    assert allowed_characters(text, "ascii") == "a\tb\n\x7f"
    assert allowed_characters(text, "latin") == "a\tb\n\x7f\u00e9\u00a0\u0153"


def test_charset_drops_or_strips_a_message_outside_its_set(tiny_lm, tiny_tok):
    dropped, clean = screened(tiny_lm, tiny_tok, [CharsetFilter()], "caf\u00e9 \u4e2d", "plain text")
    assert dropped.dropped_by == "charset" and dropped.record().action == "drop"
    assert clean.dropped_by is None and clean.record().action == "pass"
    (stripped,) = screened(tiny_lm, tiny_tok, [CharsetFilter(allow="latin", action="strip")], "caf\u00e9 \u4e2d!")
    record = stripped.record()
    assert (record.action, record.filter, record.text) == ("rewrite", "charset", "caf\u00e9 !")


def test_retokenize_gives_other_tokens_for_the_same_text_seeded_per_message(tiny_lm, tiny_tok):
    text = "the quick brown fox jumps over the lazy dog"
    spec = RetokenizeFilter(split_rate=0.5)
    (item,) = screened(tiny_lm, tiny_tok, [spec], text)
    assert item.ids is not None and item.ids != tiny_tok.encode(text, add_special_tokens=False)
    assert tiny_tok.decode(item.ids) == text and item.record().action == "rewrite"
    assert screened(tiny_lm, tiny_tok, [spec], text)[0].ids == item.ids  # the same message, the same cuts
    again = [retokenized_ids(text, tiny_tok, 0.5, generator(5, "retokenize", "b", "a", r)) for r in (3, 4)]
    assert again[0] == item.ids and again[1] != item.ids  # another round sent: other cuts


def test_a_retokenized_inbox_is_the_frame_pieces_and_the_message_ids(tiny_lm, tiny_tok):
    (inbox,) = read_inboxes(tiny_lm, tiny_tok, [read([RetokenizeFilter(split_rate=1.0)], "hi there", "ok", senders="ax")], batch_tokens=4096)
    encode = lambda text: tiny_tok.encode(text, add_special_tokens=False)  # noqa: E731
    characters = [t for c in "hi there" for t in encode(c)]  # split_rate 1: every character alone
    assert inbox.ids == encode("a: ") + characters + encode("\nx: ") + encode("o") + encode("k") + encode("\n")


def test_paraphrase_replaces_the_text_with_the_models_continuation(tiny_lm, tiny_tok):
    text = "the quick brown fox"
    (item,) = screened(tiny_lm, tiny_tok, [ParaphraseFilter(prompt=" In short:")], text)
    ids = tiny_tok.encode(text, add_special_tokens=False)
    sequence = [start_token(tiny_tok), *ids, *tiny_tok.encode(" In short:", add_special_tokens=False)]
    written: list[int] = []
    for _ in ids:  # greedy, one full forward a token, as many tokens as the message had
        chosen = int(tiny_lm(input_ids=torch.tensor([sequence + written])).logits[0, -1].argmax())
        if chosen == start_token(tiny_tok):
            break
        written.append(chosen)
    expected = tiny_tok.decode(written, skip_special_tokens=True)
    assert item.text == expected != text
    assert (item.record().action, item.record().filter, item.record().text) == ("rewrite", "paraphrase", expected)


def test_filters_apply_in_order_to_the_rewritten_text(tiny_lm, tiny_tok):
    strip_then_drop = [CharsetFilter(allow="latin", action="strip"), CharsetFilter(allow="ascii")]
    (kept,) = screened(tiny_lm, tiny_tok, strip_then_drop, "na\u00efve \u4e2d")
    assert kept.dropped_by == "charset#2" and kept.rewritten_by == ["charset#1"]  # the ï survives the strip
    (rewritten,) = screened(tiny_lm, tiny_tok, [CharsetFilter(action="strip"), CharsetFilter(allow="ascii")], "na\u00efve")
    assert rewritten.dropped_by is None and rewritten.record().text == "nave"
    text = "the quick brown fox jumps"
    (item,) = screened(tiny_lm, tiny_tok, [RetokenizeFilter(split_rate=0.5), PerplexityFilter(threshold=50.0)], text)
    (own,) = message_nll(tiny_lm, tiny_tok, [item.ids], batch_tokens=4096)
    assert item.score == pytest.approx(message_score(own, None))  # scored on the retokenized ids
    (dropped,) = screened(tiny_lm, tiny_tok, [RetokenizeFilter(split_rate=0.5), PerplexityFilter(threshold=0.01)], text)
    assert dropped.record().action == "drop" and dropped.record().filter == "perplexity"


# ---------------------------------------------------------------------------- the node's round


def _request(tok, stream, messages, firewall=(), inbox_text="") -> NodeRoundRequest:
    return NodeRoundRequest(
        node_id="b", round_index=4, control_ids=[], prefix_ids=stream[100:130], round_inputs=stream[130:138],
        targets=stream[130:138], message=RelayMessage(), message_tokens=4, seed=5, inbox_text=inbox_text,
        inbox_messages=tuple(messages), firewall=tuple(firewall),
    )


def test_without_a_firewall_an_inbox_of_messages_reads_as_the_rendered_text(tiny_lm, tiny_tok, stream):
    messages = [message("hello there", "a"), message("caf\u00e9", "c")]
    text = "a: hello there\nc: caf\u00e9\n"
    (as_messages,) = compute_rounds(tiny_lm, tiny_tok, [_request(tiny_tok, stream, messages)], top_k=8, batch_tokens=4096)
    (as_text,) = compute_rounds(tiny_lm, tiny_tok, [_request(tiny_tok, stream, [], inbox_text=text)], top_k=8, batch_tokens=4096)
    assert torch.equal(as_messages.collective.target_logprob, as_text.collective.target_logprob)
    assert as_messages.inbox_tokens == as_text.inbox_tokens == len(tiny_tok.encode(text, add_special_tokens=False))
    assert as_messages.screened == []


def test_a_firewall_needs_the_inbox_as_messages(tiny_lm, tiny_tok, stream):
    request = _request(tiny_tok, stream, [], [CharsetFilter()], inbox_text="a: caf\u00e9\n")
    with pytest.raises(ValueError, match="node b: a firewall screens `inbox_messages`"):
        compute_rounds(tiny_lm, tiny_tok, [request], top_k=8, batch_tokens=4096)


def test_a_dropped_message_never_reaches_the_context(tiny_lm, tiny_tok, stream):
    messages = [message("hello there", "a"), message("caf\u00e9", "c")]
    (screened_round,) = compute_rounds(
        tiny_lm, tiny_tok, [_request(tiny_tok, stream, messages, [CharsetFilter()])], top_k=8, batch_tokens=4096
    )
    (as_text,) = compute_rounds(
        tiny_lm, tiny_tok, [_request(tiny_tok, stream, [], inbox_text="a: hello there\n")], top_k=8, batch_tokens=4096
    )
    assert torch.equal(screened_round.collective.target_logprob, as_text.collective.target_logprob)
    assert [(s.sender, s.action) for s in screened_round.screened] == [("a", "pass"), ("c", "drop")]


# ---------------------------------------------------------------------------- a run


def _run(tiny_model_dir: Path, folder: Path, firewall: list[dict[str, Any]]):
    path = write_tiny_scenario(
        folder, tiny_model_dir, node_defaults={"model": "tiny", "message": {"policy": "relay"}, "firewall": firewall}
    )
    prepared = prepare(load_scenario(path), ModelPool(cache_dir=folder / "cache"), base_dir=folder)
    result = run_prepared(prepared, folder / "run")
    lines = (folder / "run" / "events.jsonl").read_text(encoding="utf-8").splitlines()
    events = [e for e in map(RoundEvent.model_validate_json, lines[1:-1])]
    return prepared, result.report, events


def test_a_run_with_a_firewall_records_each_screen_in_events_and_the_report(tiny_model_dir, tmp_path):
    firewall = [{"kind": "charset", "action": "strip"}, {"kind": "perplexity", "false_drop_rate": 0.3, "fit_messages": 16}]
    prepared, report, events = _run(tiny_model_dir, tmp_path, firewall)
    threshold = prepared.firewalls["a"][1].threshold  # type: ignore[union-attr]
    assert threshold is not None and prepared.scenario.node("a").firewall[1].threshold is None  # fitted at prepare
    records = [s for e in events for s in e.screened]
    scored = [s for s in records if s.score is not None]
    assert scored and all(s.threshold == prepared.firewalls[s.receiver][1].threshold for s in scored)  # type: ignore[union-attr]
    for event in events:
        for node in event.nodes:
            mine = [s for s in event.screened if s.receiver == node.node_id]
            assert node.messages_screened_out == sum(s.action == "drop" for s in mine)
            assert all(s.round_sent < event.round_index for s in mine)
    assert any(s.action == "drop" for s in records) and any(s.action == "pass" for s in records)
    assert report is not None and report.schema_version == REPORT_SCHEMA_VERSION
    for node_id, found in report.firewalls.items():
        mine = [s for s in records if s.receiver == node_id]
        assert found.messages_read == len(mine) and found.messages_dropped == sum(s.action == "drop" for s in mine)
        assert [f.filter for f in found.filters] == ["charset", "perplexity"]
        assert found.filters[1].threshold == prepared.firewalls[node_id][1].threshold  # type: ignore[union-attr]
        fit = found.filters[1].fit  # the tiny scenario's train part holds 11 windows: half and half of them
        assert fit is not None and (fit.benign_messages, fit.held_out_messages, fit.windows_available) == (6, 5, 11)
        assert fit.held_out_drop_rate is not None and fit.requested_messages == 16
        assert found.filters[1].dropped == found.messages_dropped
        assert 0 < found.seconds == pytest.approx(sum(s.seconds for s in mine)) and 0 < found.round_share < 1
    assert set(report.firewalls) == {"a", "b", "c"}
    assert "firewall of a" in report_markdown(report) and "fitted on 6 benign train messages" in report_markdown(report)
    assert "of 5 above it (11 distinct train windows, 16 asked for each half)" in report_markdown(report)


def test_a_firewall_that_drops_everything_leaves_each_node_its_isolated_context(tiny_model_dir, tmp_path):
    _, report, events = _run(tiny_model_dir, tmp_path, [{"kind": "perplexity", "threshold": 0.001}])
    assert report is not None and report.firewalls["b"].filters[0].fit is None  # given, not fitted
    read = [e for e in events if e.screened]
    assert read and all(s.action == "drop" for e in read for s in e.screened)
    for node in (n for e in events for n in e.nodes):
        assert node.inbox_tokens == 0 and node.nll_collective == node.nll_isolated  # no prompt, no inbox: one context


def test_an_older_report_still_reads_without_firewalls():
    data = json.loads((Path(__file__).parent / "data" / "report-v2.json").read_text(encoding="utf-8"))
    report = Report.model_validate(data)
    assert report.schema_version == 2 and report.firewalls == {}
    assert "firewall of" not in report_markdown(report)



def test_the_fit_reads_what_the_in_neighbours_relay_through_their_own_views(tiny_lm, tiny_tok, stream):
    """A masked sender's relays carry its placeholders, so the benign messages a receiver's
    threshold is fitted on must too (fitted on clean text, a star of masked spokes dropped
    23 of 24 honest relays); a silent sender sends none."""
    data = fw_scenario([{"kind": "perplexity", "fit_messages": 64}]).model_dump(mode="json")
    hidden = "~" if len(tiny_tok.encode("~", add_special_tokens=False)) == 1 else "_"
    data["nodes"][0]["view"] = {"kind": "masked", "tokens": 16, "keep": 0.5, "placeholder": hidden}
    sc = parse_scenario(data, source="firewall.yaml")
    graph = build_graph(sc)  # a directed ring: a -> b -> c -> a
    placeholders = placeholder_ids_for(sc, tiny_tok)
    train = Observer(stream[:TRAIN], sc.nodes, seed=sc.seed, round_tokens=8, context_tokens=32, placeholder_ids=placeholders)
    sample = benign_messages(sc, graph, train, tiny_tok, "b", 0)
    from_a = [*sample.fit, *sample.held_out]
    assert all(m.sender == "a" for m in from_a)
    clean = tiny_tok.decode(stream[:TRAIN].tolist()).count(hidden) / TRAIN
    carrying = sum(hidden in m.text for m in from_a) / len(from_a)
    assert carrying > 0.9 > 5 * clean  # about half of each relay's 8 tokens are hidden
    silent = sc.model_copy(update={"nodes": [sc.nodes[0].model_copy(update={"message": SilentMessage()}), *sc.nodes[1:]]})
    with pytest.raises(ValueError, match=r"nodes\.b\.firewall\[0\] \(perplexity\): no in-neighbour sends a benign message"):
        benign_messages(silent, graph, train, tiny_tok, "b", 0)
