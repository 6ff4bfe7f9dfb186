"""The round engine end to end on a tiny model: determinism, seeding, what may and may not
depend on the bus, and the evaluator's report built from it."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import networkx as nx
import pytest
import torch

from collective.evaluate.book import RoundBook
from collective.evaluate.evaluator import build_report
from collective.lm.models import LoadedModel
from collective.lm.predictions import TokenPredictions
from collective.records import Report, RoundEvent
from collective.run.bus import InMemoryBus
from collective.run.engine import EmbeddedExecutor, EngineResult, RoundEngine
from collective.run.pools import pool_linear
from collective.run.prepared import Prepared
from collective.scenario import Scenario, parse_scenario
from tests.tiny import pydoc_text

ROUND = 8
EVAL_ROUNDS = 5
TIMING = {"wall_seconds", "tokens_per_second"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def scenario(**changes: Any) -> Scenario:
    data: dict[str, Any] = {
        "name": "tiny",
        "seed": 3,
        "models": {"tiny": {"ref": "tiny", "dtype": "float32"}},
        "corpus": {"train_tokens": 48, "eval_tokens": ROUND * EVAL_ROUNDS},
        "node_defaults": {"model": "tiny", "message": {"policy": "generate"}},
        "nodes": [
            {"id": "a", "view": {"kind": "window", "tokens": 16}},
            {"id": "b", "view": {"kind": "lagged", "tokens": 12, "lag": 8}},
            {"id": "c", "view": {"kind": "masked", "tokens": 16, "keep": 0.5}},
            {"id": "d", "view": {"kind": "none"}, "message": {"policy": "relay"}},
        ],
        "bus": {"round_tokens": ROUND, "max_message_tokens": 4},
        "evaluation": {"context_tokens": 24, "warmup_rounds": 2, "top_k": 16},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_scenario(data, source="tiny.yaml")


def ring(node_ids: list[str]) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(node_ids)
    for a, b in zip(node_ids, node_ids[1:] + node_ids[:1]):
        graph.add_edge(a, b)
        graph.add_edge(b, a)
    return graph


def stream_for(tok, sc: Scenario) -> tuple[torch.Tensor, torch.Tensor]:
    n = sc.corpus.train_tokens + sc.corpus.eval_tokens
    ids = torch.tensor(tok.encode(pydoc_text()[:20_000], add_special_tokens=False)[:n])
    byte_lengths = torch.tensor([len(tok.decode([i]).encode("utf-8")) for i in ids.tolist()])
    return ids, byte_lengths


def run(model, tok, sc: Scenario, executor_wrapper=None) -> tuple[Report, list[RoundEvent], EngineResult]:
    graph = ring(sc.node_ids)
    lm = LoadedModel.in_memory(model, tok, "tiny")
    executor = EmbeddedExecutor(sc, {"tiny": lm}, InMemoryBus(graph, sc.bus, tok, sc.seed))
    if executor_wrapper is not None:
        executor = executor_wrapper(executor)
    stream, byte_lengths = stream_for(tok, sc)
    placeholders = {n.id: tok.encode("_", add_special_tokens=False)[0] for n in sc.nodes if n.view.kind == "masked"}
    engine = RoundEngine(sc, graph, stream, byte_lengths, executor, lm, {}, placeholders, "run")
    events: list[RoundEvent] = []
    result = engine.run(on_event=events.append)
    return build_report(sc, result, run_id="run"), events, result


def numbers(report: Report) -> dict[str, Any]:
    return report.model_dump(exclude=TIMING)


def rows(report: Report, kind: str) -> list[Any]:
    return [r.model_dump() for r in report.rows if r.row == kind]


_cache: dict[str, tuple[Report, list[RoundEvent], EngineResult]] = {}


class _Keeping:
    """An executor that keeps every round's node results (round index -> results)."""

    def __init__(self, inner: EmbeddedExecutor) -> None:
        self.inner = inner
        self.rounds: dict[int, dict] = {}

    def run_round(self, round_index, requests):
        self.rounds[round_index] = self.inner.run_round(round_index, requests)
        return self.rounds[round_index]


_default_rounds: list[_Keeping] = []  # the default run's executor


def _keeping(inner: EmbeddedExecutor) -> _Keeping:
    _default_rounds.append(_Keeping(inner))
    return _default_rounds[-1]


@pytest.fixture
def default_run(tiny_lm, tiny_tok):
    if "default" not in _cache:
        _cache["default"] = run(tiny_lm, tiny_tok, scenario(), executor_wrapper=_keeping)
    return _cache["default"]


# ---------------------------------------------------------------------------- determinism and seeds


def test_the_same_scenario_and_seed_give_identical_report_numbers(tiny_lm, tiny_tok, default_run):
    report, events, _ = default_run
    again, events_again, _ = run(tiny_lm, tiny_tok, scenario())
    assert numbers(again) == numbers(report)
    assert [e.messages for e in events_again] == [e.messages for e in events]


def test_a_different_seed_gives_different_messages(tiny_lm, tiny_tok, default_run):
    _, events, _ = default_run
    _, other, _ = run(tiny_lm, tiny_tok, scenario(seed=4))
    texts = [m.text for e in events for m in e.messages]
    other_texts = [m.text for e in other for m in e.messages]
    assert texts != other_texts  # the masked view (and so what c says and reads) moved


def test_sampled_messages_depend_on_the_seed(tiny_lm, tiny_tok):
    spec = {"model": "tiny", "message": {"policy": "generate", "sampling": "sample"}}
    first = run(tiny_lm, tiny_tok, scenario(node_defaults=spec, nodes=[
        {"id": "a", "view": {"kind": "window", "tokens": 16}}, {"id": "b", "view": {"kind": "window", "tokens": 8}}]))
    texts = [[m.text for m in e.messages] for e in first[1]]
    again = run(tiny_lm, tiny_tok, scenario(node_defaults=spec, nodes=[
        {"id": "a", "view": {"kind": "window", "tokens": 16}}, {"id": "b", "view": {"kind": "window", "tokens": 8}}]))
    other = run(tiny_lm, tiny_tok, scenario(seed=9, node_defaults=spec, nodes=[
        {"id": "a", "view": {"kind": "window", "tokens": 16}}, {"id": "b", "view": {"kind": "window", "tokens": 8}}]))
    assert [[m.text for m in e.messages] for e in again[1]] == texts
    assert [[m.text for m in e.messages] for e in other[1]] != texts
    # no view changes with the seed here: the plain rows are the same, only messages moved
    assert [r.nll for r in other[0].rows if r.row == "member_plain"] == [r.nll for r in first[0].rows if r.row == "member_plain"]


# ---------------------------------------------------------------------------- what the bus may change


def test_plain_and_isolated_rows_do_not_depend_on_the_bus(tiny_lm, tiny_tok, default_run):
    report, _, _ = default_run
    other, _, result = run(
        tiny_lm, tiny_tok, scenario(bus={"round_tokens": ROUND, "max_message_tokens": 2, "latency_rounds": 2, "drop_rate": 0.5, "retain": 2})
    )
    assert result.messages_dropped > 0
    for kind in ("member_plain", "member_isolated", "ensemble_silent", "reference"):
        assert rows(other, kind) == rows(report, kind), kind
    assert rows(other, "collective") != rows(report, "collective")  # the bus did change something


def test_a_silent_collective_has_exactly_zero_communication_gain(tiny_lm, tiny_tok):
    report, events, result = run(tiny_lm, tiny_tok, scenario(node_defaults={"model": "tiny", "message": {"policy": "silent"}},
                                                              nodes=[{"id": "a", "view": {"kind": "window", "tokens": 16}},
                                                                     {"id": "b", "view": {"kind": "lagged", "tokens": 12, "lag": 8}},
                                                                     {"id": "c", "view": {"kind": "none"}}]))
    assert result.messages_sent == 0
    assert all(node.inbox_tokens == 0 for e in events for node in e.nodes)
    gain = report.communication_gain
    assert gain.value == 0.0
    assert gain.ci.low <= 0.0 <= gain.ci.high
    assert report.row("collective").nll == report.row("ensemble_silent").nll
    for node_id in ("a", "b", "c"):
        assert report.row("member_collective", node_id).nll == report.row("member_isolated", node_id).nll
    assert "communication made no measurable difference" in report.verdict


@pytest.mark.parametrize("aggregator", ["mean", "logpool", "weighted"])
def test_every_pooling_aggregator_runs_and_a_silent_run_matches_its_silent_ensemble(tiny_lm, tiny_tok, aggregator):
    report, _, _ = run(tiny_lm, tiny_tok, scenario(
        aggregator={"kind": aggregator},
        node_defaults={"model": "tiny", "message": {"policy": "silent"}},
        nodes=[{"id": "a", "view": {"kind": "window", "tokens": 16}}, {"id": "b", "view": {"kind": "none"}}],
    ))
    assert report.row("collective").nll == report.row("ensemble_silent").nll
    assert math.isfinite(report.row("collective").nll)


def test_a_readout_collective_is_its_readout_node_in_the_collective(tiny_lm, tiny_tok):
    report, events, _ = run(tiny_lm, tiny_tok, scenario(aggregator={"kind": "readout", "node": "d"}))
    collective, member = report.row("collective"), report.row("member_collective", "d")
    assert (collective.nll, collective.top1, collective.bits_per_byte) == (member.nll, member.top1, member.bits_per_byte)
    silent = report.row("ensemble_silent")
    assert silent.nll == report.row("member_isolated", "d").nll
    for event in events:
        (d,) = [n for n in event.nodes if n.node_id == "d"]
        assert event.nll_collective == pytest.approx(d.nll_collective, rel=1e-6)


def test_an_excluded_node_talks_but_stays_out_of_both_pools(tiny_lm, tiny_tok, default_run):
    """`aggregator.exclude`: the pools are those of the other nodes' rows; the excluded node's
    messages still reach its neighbours (its member rows are the same as without exclusion)."""
    full, _, _ = default_run
    kept: list[_Keeping] = []
    report, events, _ = run(
        tiny_lm, tiny_tok, scenario(aggregator={"kind": "mean", "exclude": ["c"]}),
        executor_wrapper=lambda inner: kept.append(_Keeping(inner)) or kept[-1],
    )
    for kind in ("member_collective", "member_isolated"):
        assert rows(report, kind) == rows(full, kind)
    assert report.row("collective").nll != full.row("collective").nll
    for event in events:
        results = kept[0].rounds[event.round_index]
        members = TokenPredictions.stack([results[n].collective for n in ("a", "b", "d")])
        pooled = pool_linear(members, torch.ones(3) / 3)
        assert event.nll_collective == pytest.approx(float(-pooled.target_logprob.mean()), abs=1e-6)


def test_the_reference_equals_a_full_view_member_without_messages(tiny_lm, tiny_tok):
    report, _, _ = run(tiny_lm, tiny_tok, scenario(nodes=[{"id": "a", "view": {"kind": "full"}}, {"id": "b", "view": {"kind": "none"}}]))
    assert report.row("reference").nll == pytest.approx(report.row("member_plain", "a").nll, abs=1e-5)
    assert report.row("reference").n_tokens == report.row("member_plain", "a").n_tokens


# ---------------------------------------------------------------------------- rounds, latency, misses


def test_only_eval_rounds_are_booked_after_the_warm_up(default_run):
    report, events, result = default_run
    assert [e.phase for e in events] == ["warmup"] * 2 + ["eval"] * EVAL_ROUNDS
    assert [e.eval_round for e in events] == [None, None, *range(EVAL_ROUNDS)]
    assert [e.start_token for e in events] == [48 + ROUND * (i - 2) for i in range(2 + EVAL_ROUNDS)]
    assert (result.rounds_done, result.eval_rounds_done, result.eval_tokens) == (7, EVAL_ROUNDS, ROUND * EVAL_ROUNDS)
    assert report.n_eval_tokens == ROUND * EVAL_ROUNDS


def test_inboxes_fill_after_the_latency(tiny_lm, tiny_tok):
    _, events, _ = run(tiny_lm, tiny_tok, scenario(bus={"round_tokens": ROUND, "max_message_tokens": 4, "latency_rounds": 3}))
    inbox = [[n.inbox_tokens for n in e.nodes] for e in events]
    assert inbox[:3] == [[0, 0, 0, 0]] * 3
    assert all(all(n > 0 for n in row) for row in inbox[3:])


def test_event_member_losses_agree_with_the_report(default_run):
    report, events, _ = default_run
    eval_events = [e for e in events if e.phase == "eval"]
    for node_id in ("a", "b", "c", "d"):
        for kind, attr in (("member_plain", "nll_plain"), ("member_collective", "nll_collective")):
            per_round = [getattr(n, attr) for e in eval_events for n in e.nodes if n.node_id == node_id]
            assert report.row(kind, node_id).nll == pytest.approx(sum(per_round) / len(per_round), rel=1e-5)
    assert report.row("collective").nll == pytest.approx(sum(e.nll_collective for e in eval_events) / EVAL_ROUNDS, rel=1e-5)
    assert report.row("reference").nll == pytest.approx(sum(e.nll_reference for e in eval_events) / EVAL_ROUNDS, rel=1e-5)


def test_messages_respect_the_budget_and_are_counted(default_run):
    report, events, result = default_run
    messages = [m for e in events for m in e.messages]
    assert len(messages) == result.messages_sent == report.messages_sent == 7 * 4 * 2  # 4 nodes, 2 neighbours
    assert all(m.n_tokens <= 4 and m.n_bytes <= 160 for m in messages)
    assert all(m.deliver_round == m.round_sent + 1 for m in messages)


class _Missing:
    """An executor that loses node `b` in round 3."""

    def __init__(self, inner: EmbeddedExecutor) -> None:
        self.inner = inner

    def run_round(self, round_index, requests):
        results = self.inner.run_round(round_index, requests)
        if round_index == 3:
            results["b"] = None
        return results


def test_a_node_that_misses_a_round_is_counted_and_not_scored(tiny_lm, tiny_tok):
    report, events, result = run(tiny_lm, tiny_tok, scenario(), executor_wrapper=_Missing)
    assert result.missed_rounds == {"a": 0, "b": 1, "c": 0, "d": 0}
    assert report.missed_rounds == {"b": 1}
    assert report.row("member_plain", "b").n_tokens == ROUND * (EVAL_ROUNDS - 1)
    assert report.row("member_plain", "a").n_tokens == ROUND * EVAL_ROUNDS
    assert report.row("collective").n_tokens == ROUND * EVAL_ROUNDS
    assert [n.missed for n in events[3].nodes] == [False, True, False, False]
    assert math.isfinite(report.row("collective").nll)


class _WithoutIsolated:
    """An executor whose node `b` returns no isolated row in round 3 (as if not asked for it)."""

    def __init__(self, inner: EmbeddedExecutor) -> None:
        self.inner = inner
        self.kept: dict = {}

    def run_round(self, round_index, requests):
        results = self.inner.run_round(round_index, requests)
        if round_index == 3:
            self.kept = dict(results)
            results["b"] = replace(results["b"], isolated=None)
        return results


def test_a_node_without_an_isolated_row_is_left_out_of_the_silent_ensemble_and_not_scored(tiny_lm, tiny_tok, default_run):
    wrappers: list[_WithoutIsolated] = []

    def wrap(inner: EmbeddedExecutor) -> _WithoutIsolated:
        wrappers.append(_WithoutIsolated(inner))
        return wrappers[-1]

    report, events, _ = run(tiny_lm, tiny_tok, scenario(), executor_wrapper=wrap)
    assert report.row("member_isolated", "b").n_tokens == ROUND * (EVAL_ROUNDS - 1)
    assert report.row("member_plain", "b").n_tokens == ROUND * EVAL_ROUNDS
    assert report.row("ensemble_silent").n_tokens == ROUND * EVAL_ROUNDS
    assert events[3].nodes[1].nll_isolated is None and not events[3].nodes[1].missed
    kept = wrappers[0].kept
    others = TokenPredictions.stack([kept[n].isolated for n in ("a", "c", "d")])
    silent = pool_linear(others, torch.full((3,), 1 / 3))  # the mean pool of the three that have the row
    assert events[3].nll_silent == pytest.approx(float(-silent.target_logprob.mean()), rel=1e-6)
    default, _, _ = default_run
    assert rows(report, "collective") == rows(default, "collective")  # the collective rows are all there


def test_an_engine_from_a_prepared_run_is_the_engine_of_its_parts(tiny_lm, tiny_tok, default_run):
    sc = scenario()
    stream, byte_lengths = stream_for(tiny_tok, sc)
    placeholders = {n.id: tiny_tok.encode("_", add_special_tokens=False)[0] for n in sc.nodes if n.view.kind == "masked"}
    models = {"tiny": LoadedModel.in_memory(tiny_lm, tiny_tok, "tiny")}
    prepared = Prepared(sc, models, ring(sc.node_ids), stream, byte_lengths, placeholders, {n: [] for n in sc.node_ids})
    engine = RoundEngine.from_prepared(prepared, EmbeddedExecutor.from_prepared(prepared), "run")
    assert numbers(build_report(sc, engine.run(), run_id="run")) == numbers(default_run[0])


# ---------------------------------------------------------------------------- the report


def test_the_report_has_every_row_in_order(default_run):
    report, _, _ = default_run
    expected = [(kind, node) for kind in ("member_plain", "member_isolated", "member_collective") for node in "abcd"]
    expected += [("ensemble_silent", None), ("collective", None), ("reference", None)]
    assert [(r.row, r.node_id) for r in report.rows] == expected
    assert {r.model for r in report.rows if r.node_id} == {"tiny"}
    assert report.row("reference").model == "tiny"


def _recomputed_rows(model, tok, sc: Scenario, rounds: dict[int, dict]) -> dict[tuple[str, str | None], tuple[float, float]]:
    """(nll, top1) of every report row, recomputed from the eval rounds' raw records and the
    stream: member rows from each node's records, the mean-pooled rows as the mixture of the
    members' exact target probabilities (top-1: the argmax of the mixture of their recorded,
    top-k plus even tail, distributions, built densely), the reference from a plain forward."""
    stream, _ = stream_for(tok, sc)
    starts = [48 + ROUND * i for i in range(EVAL_ROUNDS)]
    targets = stream[48 : 48 + ROUND * EVAL_ROUNDS]
    results = [rounds[2 + i] for i in range(EVAL_ROUNDS)]

    def stats(logprob: torch.Tensor, top1: torch.Tensor) -> tuple[float, float]:
        return float(-logprob.double().mean()), float((top1 == targets).double().mean())

    def records(node_id: str, attr: str) -> TokenPredictions:
        parts = [getattr(r[node_id], attr) for r in results]
        return TokenPredictions(torch.cat([p.target_logprob for p in parts], 1), torch.cat([p.topk_ids for p in parts], 1),
                                torch.cat([p.topk_logprobs for p in parts], 1), parts[0].vocab_size)

    expected = {}
    for attr, kind, pooled in (("plain", "member_plain", None), ("isolated", "member_isolated", "ensemble_silent"),
                               ("collective", "member_collective", "collective")):
        members = [records(n, attr) for n in sc.node_ids]
        for node_id, rec in zip(sc.node_ids, members):
            expected[(kind, node_id)] = stats(rec.target_logprob[0], rec.topk_ids[0, :, 0])
        if pooled is not None:
            lp = torch.cat([m.target_logprob for m in members]).double()  # (N, T)
            mixture = torch.logsumexp(lp, 0) - math.log(len(members))
            q = torch.zeros(len(members), len(targets), members[0].vocab_size, dtype=torch.float64)  # (N, T, V)
            for i, m in enumerate(members):
                top = m.topk_logprobs[0].double().exp()  # (T, K)
                q[i] = ((1 - top.sum(-1, keepdim=True)) / (m.vocab_size - top.shape[-1])).expand(-1, m.vocab_size)
                q[i].scatter_(-1, m.topk_ids[0], top)
            expected[(pooled, None)] = stats(mixture, q.mean(0).argmax(-1))
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    with torch.no_grad():
        logits = torch.cat([model(input_ids=torch.tensor([[bos, *stream[s - 24 : s + ROUND - 1].tolist()]])).logits[0, -ROUND:]
                            for s in starts])  # (T, V)
    reference = torch.log_softmax(logits.double(), -1)
    expected[("reference", None)] = stats(reference.gather(-1, targets.unsqueeze(-1)).squeeze(-1), reference.argmax(-1))
    return expected


def test_report_rows_and_gains_are_the_raw_rounds_recomputed(tiny_lm, tiny_tok, default_run):
    report, _, _ = default_run
    sc = scenario()
    expected = _recomputed_rows(tiny_lm, tiny_tok, sc, _default_rounds[0].rounds)
    _, byte_lengths = stream_for(tiny_tok, sc)
    n_tokens, n_bytes = ROUND * EVAL_ROUNDS, int(byte_lengths[48 : 48 + ROUND * EVAL_ROUNDS].sum())
    assert (report.n_eval_tokens, report.eval_bytes) == (n_tokens, n_bytes)
    assert {(r.row, r.node_id) for r in report.rows} == set(expected)
    for row in report.rows:
        nll, top1 = expected[(row.row, row.node_id)]
        assert row.nll == pytest.approx(nll, abs=1e-5), row.row
        assert row.top1 == pytest.approx(top1, abs=1e-12), row.row
        assert row.n_tokens == n_tokens
        assert row.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
        assert row.bits_per_byte == pytest.approx(nll * n_tokens / math.log(2) / n_bytes, rel=1e-5)
        assert row.nll_ci.low <= row.nll <= row.nll_ci.high
    isolated = {n: expected[("member_isolated", n)][0] for n in sc.node_ids}
    best = min(isolated, key=isolated.__getitem__)
    collective, silent = expected[("collective", None)][0], expected[("ensemble_silent", None)][0]
    assert report.best_member == best
    assert report.collective_gain.value == pytest.approx(isolated[best] - collective, abs=1e-5)
    assert report.communication_gain.value == pytest.approx(silent - collective, abs=1e-5)
    for gain in (report.collective_gain, report.communication_gain):
        assert gain.ci.low <= gain.value <= gain.ci.high
    assert Report.model_validate_json(report.model_dump_json()) == report


def test_a_report_needs_an_eval_round(tiny_lm, tiny_tok):
    sc = scenario()
    result = EngineResult(book=RoundBook(sc.node_ids), rounds_done=2, eval_rounds_done=0, missed_rounds={}, messages_sent=0,
                          messages_dropped=0, messages_truncated=0, wall_seconds=0.0, eval_tokens=0, eval_bytes=0)
    with pytest.raises(ValueError, match="no eval round"):
        build_report(sc, result, run_id="x")


def test_should_stop_ends_the_run_between_rounds(tiny_lm, tiny_tok):
    sc = scenario(nodes=[{"id": "a", "view": {"kind": "window", "tokens": 16}}, {"id": "b", "view": {"kind": "none"}}])
    graph = ring(sc.node_ids)
    lm = LoadedModel.in_memory(tiny_lm, tiny_tok, "tiny")
    stream, byte_lengths = stream_for(tiny_tok, sc)
    engine = RoundEngine(sc, graph, stream, byte_lengths, EmbeddedExecutor(sc, {"tiny": lm}, InMemoryBus(graph, sc.bus, tiny_tok, 0)),
                         lm, {}, {}, "run")
    events: list[RoundEvent] = []
    result = engine.run(on_event=events.append, should_stop=lambda: len(events) >= 3)
    assert (result.rounds_done, result.eval_rounds_done, len(events)) == (3, 1, 3)
