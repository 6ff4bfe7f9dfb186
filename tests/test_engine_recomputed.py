"""The round engine against what a run must be, recomputed without the engine: no round
reads a token it should not (at or after its end, in a lagged node's gap, hidden from a
masked node), and a member's plain row and the mean and Hedge collectives equal a plain
transformers forward pass on raw stream slices and a dense mixture of its full logits."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from collective.evaluate.evaluator import build_report
from collective.lm.models import LoadedModel
from collective.records import Report, RoundEvent
from collective.run.bus import InMemoryBus
from collective.run.engine import EmbeddedExecutor, Results, RoundEngine, RoundPools
from collective.scenario import Scenario
from collective.seeding import generator
from tests.test_aggregate import dense_recorded
from tests.test_engine import EVAL_ROUNDS, ROUND, ring, scenario, stream_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WARMUP = 2  # test_engine's scenario: 2 warm-up rounds, then EVAL_ROUNDS eval rounds from token 48
TRAIN = 48


class _Keeping(RoundEngine):
    """The engine, keeping each round's node results and pools, and the run's report."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.results: dict[int, Results] = {}
        self.pools: dict[int, RoundPools] = {}
        self.report: Report | None = None

    def pool(self, start: int, targets: torch.Tensor, results: Results) -> RoundPools:
        pools = super().pool(start, targets, results)
        self.results[start], self.pools[start] = results, pools
        return pools


def _run(model, tok, sc: Scenario, stream: torch.Tensor) -> tuple[_Keeping, list[RoundEvent]]:
    graph = ring(sc.node_ids)
    lm = LoadedModel.in_memory(model, tok, "tiny")
    _, byte_lengths = stream_for(tok, sc)
    placeholders = {n.id: _placeholder(tok) for n in sc.nodes if n.view.kind == "masked"}
    executor = EmbeddedExecutor(sc, {"tiny": lm}, InMemoryBus(graph, sc.bus, tok, sc.seed))
    engine = _Keeping(sc, graph, stream, byte_lengths, executor, lm, {}, placeholders, "run")
    events: list[RoundEvent] = []
    engine.report = build_report(sc, engine.run(on_event=events.append), run_id="run")
    return engine, events


def _placeholder(tok) -> int:
    return tok.encode("_", add_special_tokens=False)[0]


def _start(round_index: int) -> int:
    return TRAIN + (round_index - WARMUP) * ROUND


def _same(a: Any, b: Any) -> bool:
    """Bitwise equality of records, pools and node results (tensors compared exactly)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if a is None or isinstance(a, (str, int, float, list)):
        return a == b
    return type(a) is type(b) and all(_same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)


def _node_rows(engine: _Keeping, start: int, node_id: str, rows: tuple[str, ...]) -> list[Any]:
    result = engine.results[start][node_id]
    assert result is not None
    return [getattr(result, row) for row in rows]


# ---------------------------------------------------------------------------- look-ahead


def test_no_row_pool_or_message_of_a_round_depends_on_tokens_at_or_after_its_end(tiny_lm, tiny_tok):
    sc = scenario()
    stream, _ = stream_for(tiny_tok, sc)
    last = WARMUP + 1  # the second eval round
    end = _start(last) + ROUND
    changed = stream.clone()
    changed[end:] = (stream[end:] * 7 + 3) % len(tiny_tok)
    assert not torch.equal(changed[end:], stream[end:])
    base, base_events = _run(tiny_lm, tiny_tok, sc, stream)
    other, other_events = _run(tiny_lm, tiny_tok, sc, changed)
    for round_index in range(last + 1):  # warm-up rounds and eval rounds up to `last`
        start = _start(round_index)
        assert _same(other.pools[start], base.pools[start]), round_index
        for node_id in sc.node_ids:
            assert _same(other.results[start][node_id], base.results[start][node_id]), (round_index, node_id)
        assert other_events[round_index].messages == base_events[round_index].messages
        assert other_events[round_index].nodes == base_events[round_index].nodes
    later = _start(last + 1)
    assert not _same(other.pools[later], base.pools[later])  # the change is there to be seen


def test_a_lagged_node_never_reads_its_gap_nor_a_masked_node_what_its_mask_hides(tiny_lm, tiny_tok):
    """Round r's tokens in node b's gap (lag 8 before the round), and the tokens of c's view
    that c's mask hides, are changed: b's and c's plain and isolated rows of round r stay
    the same, while node a (window 16), which sees those tokens, scores differently."""
    sc = scenario()
    stream, _ = stream_for(tiny_tok, sc)
    start = _start(WARMUP + 2)
    (masked,) = [n for n in sc.nodes if n.id == "c"]
    keep = masked.view.keep  # type: ignore[union-attr]
    kept = torch.rand(len(stream), generator=generator(sc.seed, "mask", "c")) < keep  # (S,) the seeded mask
    hidden = [p for p in range(start - 16, start) if not bool(kept[p])]
    assert hidden
    rows = ("plain", "isolated")
    base, _ = _run(tiny_lm, tiny_tok, sc, stream)
    for node_id, positions in (("b", list(range(start - 8, start))), ("c", hidden)):
        changed = stream.clone()
        index = torch.tensor(positions)
        changed[index] = (stream[index] * 5 + 11) % len(tiny_tok)
        assert not torch.equal(changed[index], stream[index])
        other, _ = _run(tiny_lm, tiny_tok, sc, changed)
        for mine, theirs in zip(_node_rows(other, start, node_id, rows), _node_rows(base, start, node_id, rows)):
            assert _same(mine, theirs), node_id
        sees = _node_rows(other, start, "a", ("plain",))[0]
        assert not _same(sees, _node_rows(base, start, "a", ("plain",))[0]), node_id


# ---------------------------------------------------------------------------- recomputed rows


def _view_ids(sc: Scenario, stream: torch.Tensor, node_id: str, start: int, placeholder: int) -> tuple[list[int], list[int]]:
    """What node_id reads before round `start` and of the round, cut from the raw stream as
    scenarios/README.md defines the views (not with the engine's Observer)."""
    node = sc.node(node_id)
    view = node.view
    shown = stream.clone()
    if view.kind == "masked":
        kept = torch.rand(len(stream), generator=generator(sc.seed, "mask", node_id)) < view.keep
        shown = torch.where(kept, stream, torch.full_like(stream, placeholder))
    if view.kind == "none":
        before: list[int] = []
    elif view.kind == "lagged":
        before = shown[start - view.lag - view.tokens : start - view.lag].tolist()
    else:  # window, masked
        before = shown[start - view.tokens : start].tolist()
    return before, shown[start : start + ROUND].tolist()


@torch.no_grad()
def _plain_logprobs(model, tok, sc: Scenario, stream: torch.Tensor, node_id: str, start: int) -> torch.Tensor:
    """(R, V) the node's next-token log-probabilities at each position of the round, from one
    unpadded transformers forward pass over [<|endoftext|>][view][round[:-1]]."""
    before, reading = _view_ids(sc, stream, node_id, start, _placeholder(tok))
    ids = [tok.convert_tokens_to_ids("<|endoftext|>"), *before, *reading[:-1]]
    logits = model(input_ids=torch.tensor([ids])).logits[0, -ROUND:]  # (R, V)
    return torch.log_softmax(logits.double(), dim=-1)


def test_plain_rows_of_a_lagged_and_a_masked_member_equal_a_plain_forward_on_raw_stream_slices(tiny_lm, tiny_tok):
    sc = scenario()
    stream, _ = stream_for(tiny_tok, sc)
    engine, events = _run(tiny_lm, tiny_tok, sc, stream)
    for node_id in ("b", "c"):
        index = sc.node_ids.index(node_id)
        nll, top1 = [], []
        for round_index in range(WARMUP, WARMUP + EVAL_ROUNDS):
            start = _start(round_index)
            targets = stream[start : start + ROUND]
            logprobs = _plain_logprobs(tiny_lm, tiny_tok, sc, stream, node_id, start)
            round_nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (R,)
            assert events[round_index].nodes[index].nll_plain == pytest.approx(float(round_nll.mean()), abs=2e-5)
            nll.append(round_nll)
            top1.append(logprobs.argmax(-1) == targets)
            plain = _node_rows(engine, start, node_id, ("plain",))[0]
            assert torch.equal(plain.topk_ids[0, :, 0], logprobs.argmax(-1))
            assert torch.allclose(plain.topk_logprobs[0].double(), logprobs.topk(sc.evaluation.top_k, -1).values, atol=2e-5)
        assert engine.report is not None
        row = engine.report.row("member_plain", node_id)
        assert row.nll == pytest.approx(float(torch.cat(nll).mean()), abs=2e-5)
        assert row.top1 == pytest.approx(float(torch.cat(top1).double().mean()), abs=1e-12)


@pytest.mark.parametrize("aggregator", [{"kind": "mean"}, {"kind": "weighted", "method": "hedge", "eta": 0.5}], ids=["mean", "hedge"])
def test_mean_and_hedge_collectives_equal_a_dense_mixture_of_the_members_full_logits(tiny_lm, tiny_tok, aggregator):
    """Silent members (so their collective rows are their plain rows): the mixture's NLL of
    every round, warm-up included (Hedge learns there), from full log-probabilities; Hedge's
    weights recomputed from the members' cumulative losses before each position; top-1 the
    argmax of the mixture of the recorded (top-k, even tail) distributions."""
    nodes = [{**node.model_dump(include={"id", "view"}), "message": {"policy": "silent"}} for node in scenario().nodes]
    sc = scenario(aggregator=aggregator, nodes=nodes)
    assert [n.view.kind for n in sc.nodes] == ["window", "lagged", "masked", "none"]
    stream, _ = stream_for(tiny_tok, sc)
    engine, events = _run(tiny_lm, tiny_tok, sc, stream)
    n_members = len(sc.node_ids)
    eta = aggregator.get("eta", 0.0)
    cumulative = torch.zeros(n_members, dtype=torch.float64)  # (N,) nats
    eval_nll, eval_hits = [], []
    for round_index in range(WARMUP + EVAL_ROUNDS):
        start = _start(round_index)
        targets = stream[start : start + ROUND]
        logprobs = torch.stack([_plain_logprobs(tiny_lm, tiny_tok, sc, stream, n, start) for n in sc.node_ids])  # (N, R, V)
        losses = -logprobs.gather(-1, targets.view(1, -1, 1).expand(n_members, -1, 1)).squeeze(-1)  # (N, R)
        before = cumulative.unsqueeze(1) + torch.cat([torch.zeros(n_members, 1, dtype=torch.float64), losses.cumsum(1)[:, :-1]], 1)
        weights = torch.softmax(-eta * before, dim=0)  # (N, R): uniform for the mean (eta = 0)
        cumulative = cumulative + losses.sum(1)
        mixture = (weights.unsqueeze(-1) * logprobs.exp()).sum(0)  # (R, V)
        pooled_nll = -mixture.gather(-1, targets.unsqueeze(-1)).squeeze(-1).log()  # (R,)
        assert events[round_index].nll_collective == pytest.approx(float(pooled_nll.mean()), abs=2e-5), round_index
        recorded = (weights.unsqueeze(-1) * dense_recorded(logprobs, sc.evaluation.top_k).exp()).sum(0)  # (R, V)
        assert torch.equal(engine.pools[start].collective.top1, recorded.argmax(-1)), round_index
        if round_index >= WARMUP:
            eval_nll.append(pooled_nll)
            eval_hits.append(recorded.argmax(-1) == targets)
    assert engine.report is not None
    collective = engine.report.row("collective")
    assert collective.nll == pytest.approx(float(torch.cat(eval_nll).mean()), abs=2e-5)
    assert collective.top1 == pytest.approx(float(torch.cat(eval_hits).double().mean()), abs=1e-12)
