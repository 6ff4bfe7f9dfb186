"""What keeps a host's and a coordinator's cost per round linear in the node count, and the
scale benchmark's pure pieces (bench/scale.py)."""

from __future__ import annotations

import asyncio
import math
import threading
from types import SimpleNamespace

import pytest
import yaml

from bench.scale import host_groups, hosts_of, per_round_measures, scenario_spec
from bench.scale_fit import growth, linear_fit, segment_exponents, top_segment_range
from collective.distributed import backend as node_backend
from collective.distributed.host_batch import HostBackend
from collective.distributed.protocol import Rejected
from collective.distributed.volunteer import NodeModel, SoloBackend, published_scenario
from collective.scenario import EvaluationSpec


def test_hosts_grow_past_their_size_only_where_the_host_count_would_pass_its_limit():
    assert [hosts_of(n, 16, 16) for n in (64, 256, 1024)] == [16, 16, 64]  # 1024 in 16 hosts of 64, not 64 of 16
    assert hosts_of(1000, 16, 16) == 63 and len(host_groups([str(i) for i in range(1000)], 63)) == 16
    assert hosts_of(1024, 16, 64) == 16


def test_a_fixed_cost_plus_a_cost_per_node_is_fitted_as_a_plus_b_n():
    nodes = [16, 64, 256]
    fit = linear_fit(nodes, [40.0 + 0.5 * n for n in nodes])
    assert (fit.intercept, fit.slope) == pytest.approx((40.0, 0.5))
    # repeats: several values per node count, fitted together (least squares by hand: x 16, 16, 64, 64)
    fit = linear_fit([16, 16, 64, 64], [10.0, 12.0, 34.0, 36.0])
    assert (fit.intercept, fit.slope) == pytest.approx((3.0, 0.5))
    assert math.isnan(linear_fit([16, 16], [1.0, 2.0]).slope)


def test_the_exponent_is_read_segment_by_segment_and_a_fixed_cost_does_not_bend_the_top_one_below_linear():
    """40 ms fixed + 0.5 ms per node: one exponent through the three points (0.61) would say
    sublinear; the segments say 0.36 then 0.75, approaching 1 as the fixed cost fades."""
    nodes = [16, 64, 256]
    values = [40.0 + 0.5 * n for n in nodes]  # 48, 72, 168
    segments = segment_exponents(nodes, values)
    assert [(a, b) for a, b, _ in segments] == [(16, 64), (64, 256)]
    assert segments[0][2] == pytest.approx(math.log(72 / 48) / math.log(4))
    assert segments[1][2] == pytest.approx(math.log(168 / 72) / math.log(4))
    # the numbers of issue 19: one-host overhead growing 0.70 then 1.03
    grown = [100.0, 100.0 * 4**0.70, 100.0 * 4**0.70 * 4**1.03]
    assert [round(e, 2) for _, _, e in segment_exponents([16, 64, 256], grown)] == [0.70, 1.03]
    assert top_segment_range((64, [10.0, 20.0]), (256, [40.0, 80.0])) == pytest.approx((0.5, 1.5))


def test_growth_fits_every_repeat_and_gives_the_top_segment_with_its_range():
    def point(nodes, values):
        return {"config": "one host", "nodes": nodes, "overhead_ms": sorted(values)[1],
                "repeats": [{"overhead_ms": v} for v in values]}

    points = [point(16, [47.0, 48.0, 49.0]), point(64, [71.0, 72.0, 73.0]), point(256, [167.0, 168.0, 169.0])]
    fit = growth(points, ["one host"], ["overhead_ms"])["one host"]["overhead_ms"]
    assert (fit["a"], fit["b"]) == pytest.approx((40.0, 0.5))
    assert fit["segments"][-1][2] == pytest.approx(math.log(168 / 72) / math.log(4))
    assert fit["top_range"] == pytest.approx((math.log(167 / 73) / math.log(4), math.log(169 / 71) / math.log(4)))


def test_a_rounds_measures_are_the_samples_after_it_less_those_before_it_and_the_warm_up_is_left_out():
    """Three rounds, one of warm-up: samples before round 0 and after each round; round r's CPU
    and bytes are sample r+1 less sample r, its overhead its wall less the slowest compute."""
    samples = [
        {"t": 0.0, "cpu": 10.0 * k * k, "mqtt": 2.0 * k, "broker": 0.5 * k, "in": 100 * k, "out": 7 * k * k, "hosts": 3.0 * k}
        for k in range(4)
    ]
    walls, compute, collect = [9.0, 0.5, 0.25], [8.0, 0.125, 0.0625], [8.5, 0.375, 0.1875]
    rows = per_round_measures(samples, walls, compute, collect, warmup=1)
    assert [row["coord_cpu_ms"] for row in rows] == [1000 * (40.0 - 10.0), 1000 * (90.0 - 40.0)]
    assert [row["bytes_out"] for row in rows] == [28 - 7, 63 - 28]
    assert [row["round_ms"] for row in rows] == [500.0, 250.0]
    assert [(row["overhead_ms"], row["bus_ms"], row["engine_ms"]) for row in rows] == [(375.0, 250.0, 125.0), (187.5, 125.0, 62.5)]
    assert all(row["mqtt_cpu_ms"] == 2000.0 and row["hosts_cpu_ms"] == 3000.0 and row["bytes_in"] == 100 for row in rows)


def test_host_groups_hold_every_node_once_in_order():
    ids = [f"n{i}" for i in range(40)]
    assert host_groups(ids, None) == [ids]
    groups = host_groups(ids, 16)
    assert [len(g) for g in groups] == [16, 16, 8] and sum(groups, []) == ids


def test_a_host_batch_asks_who_is_expected_once_per_round_and_goes_when_all_asked():
    """The old batch compared every arrival with a fresh `expected()` set: O(N) per request,
    O(N^2) per round. Now the set is taken once, when the round's first request opens the batch."""
    n_nodes = 200
    ids = [f"n{i}" for i in range(n_nodes)]
    asked: list[int] = []

    def expected() -> set[str]:
        asked.append(1)
        return set(ids)

    backend = HostBackend(None, expected, rank=ids.index, report=lambda line: None, grace_s=60.0)
    batches: list[list[str]] = []

    def compute(batch):  # stands in for the batched pass: the nodes of the batch, in the scenario's order
        order = sorted(batch.wanted, key=ids.index)
        batches.append(order)
        return {n: f"result of {n}" for n in order}, [order]

    backend._compute = compute  # type: ignore[method-assign]
    loaded = NodeModel(model=None, tokenizer=None, name="m", vocab_size=8, device="cpu")

    async def one_round(round_index: int) -> list[object]:
        request = SimpleNamespace(round_index=round_index)
        calls = [backend.compute(n, loaded, request, EvaluationSpec()) for n in reversed(ids)]  # type: ignore[arg-type]
        return await asyncio.wait_for(asyncio.gather(*calls), 10)  # the 60 s grace never comes into it

    results = asyncio.run(one_round(0))
    assert results == [f"result of {n}" for n in reversed(ids)]
    assert batches == [ids] and len(asked) == 1
    asyncio.run(one_round(1))
    assert len(batches) == 2 and len(asked) == 2


def test_every_round_of_a_host_and_of_a_volunteer_runs_on_the_one_compute_thread():
    """`asyncio.to_thread` spread rounds over pool threads, each with its own OpenMP team in
    torch, and a host's batched pass slowed by 40% (bench/bus.py); every pass now runs on one
    thread, whichever backend asks."""
    ids = ["a", "b"]
    threads: list[int] = []
    backend = HostBackend(None, lambda: set(ids), rank=ids.index, report=lambda line: None, grace_s=60.0)

    def compute(batch):
        threads.append(threading.get_ident())
        return {n: n for n in batch.wanted}, [list(batch.wanted)]

    backend._compute = compute  # type: ignore[method-assign]
    loaded = NodeModel(model=None, tokenizer=None, name="m", vocab_size=8, device="cpu")

    async def rounds() -> None:
        for round_index in range(6):
            request = SimpleNamespace(round_index=round_index)
            await asyncio.gather(*(backend.compute(n, loaded, request, EvaluationSpec()) for n in ids))  # type: ignore[arg-type]
            # meanwhile other work keeps the default pool's threads busy
            await asyncio.gather(*(asyncio.to_thread(threading.get_ident) for _ in range(8)))

    asyncio.run(rounds())
    assert len(threads) == 6 and len(set(threads)) == 1

    solo: list[int] = []

    def fake_compute_rounds(model, tokenizer, requests, **kwargs):  # noqa: ARG001
        solo.append(threading.get_ident())
        return ["result"]

    async def solo_rounds() -> None:
        for _ in range(4):
            await SoloBackend().compute("a", loaded, SimpleNamespace(), EvaluationSpec())  # type: ignore[arg-type]
            await asyncio.gather(*(asyncio.to_thread(threading.get_ident) for _ in range(8)))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(node_backend, "compute_rounds", fake_compute_rounds)
        asyncio.run(solo_rounds())
    assert len(solo) == 4 and set(solo) == set(threads)


def test_a_published_scenario_is_parsed_once_per_process_however_many_nodes_receive_it(tmp_path):
    spec = scenario_spec(64, tmp_path / "model", rounds=2, warmup=1, round_tokens=8, top_k=8)
    text = yaml.safe_dump(spec, sort_keys=False)
    first, limit = published_scenario(text, "r1")
    again, _ = published_scenario(str(text[:-1] + text[-1]), "r1")  # an equal string, another object
    assert again is first and len(first.nodes) == 64 and limit > 12 * 8
    with pytest.raises(Rejected, match="does not validate"):
        published_scenario(text.replace("round_tokens: 8", "round_tokens: -1"), "r1")


class CountingCodec:
    def __init__(self, codec) -> None:
        self.codec, self.encoded = codec, 0

    def encode(self, text, add_special_tokens=True):
        self.encoded += 1
        return self.codec.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens=False):
        return self.codec.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("text", ["a short note", "a message far longer than any link of this run lets through, cut to fit " * 3])
def test_checking_a_results_messages_encodes_each_text_once_and_gives_the_link_policies_records(tiny_tok, text):
    """A node with four out-links: the check recomputes the four records (each cut to the same
    budget) with one tokenizer call per distinct text, not two calls per link."""
    from collective.distributed.validation import ResultCheck
    from collective.run.bus import link_policies, outgoing_messages
    from collective.specs import BusSpec

    receivers = ["b", "c", "d", "e"]
    policies = link_policies(BusSpec(max_message_tokens=8, max_message_bytes=64), [("a", r) for r in receivers])
    records = outgoing_messages("a", text, 3, receivers, policies, tiny_tok, 0)
    codec = CountingCodec(tiny_tok)
    check = ResultCheck(top_k=4, seed=0, vocab_sizes={}, out_neighbours={"a": receivers}, policies=policies, codec=codec)
    assert check.messages("a", 3, SimpleNamespace(message_text=text, messages=records)) == records  # type: ignore[arg-type]
    assert codec.encoded == len({text, records[0].text})


def test_records_claiming_more_than_a_links_budget_are_over_budget_and_each_text_is_encoded_once(tiny_tok):
    """A node that sends its uncut text over four links of 8 tokens: rejected as over budget,
    with one tokenizer call for its text and one for the cut the check computed (the forged
    records' texts are the message's: not encoded again, per link or at all)."""
    from collective.distributed.validation import ResultCheck
    from collective.run.bus import link_policies, outgoing_messages
    from collective.specs import BusSpec

    text = "a message far longer than any link of this run lets through, cut to fit " * 3
    receivers = ["b", "c", "d", "e"]
    policies = link_policies(BusSpec(max_message_tokens=8, max_message_bytes=1000), [("a", r) for r in receivers])
    loose = link_policies(BusSpec(max_message_tokens=1000, max_message_bytes=1000), [("a", r) for r in receivers])
    forged = outgoing_messages("a", text, 3, receivers, loose, tiny_tok, 0)
    codec = CountingCodec(tiny_tok)
    check = ResultCheck(top_k=4, seed=0, vocab_sizes={}, out_neighbours={"a": receivers}, policies=policies, codec=codec)
    with pytest.raises(Rejected) as caught:
        check.messages("a", 3, SimpleNamespace(message_text=text, messages=forged))  # type: ignore[arg-type]
    assert caught.value.reason == "over_budget"
    assert codec.encoded == 2
    honest = outgoing_messages("a", text, 3, receivers, policies, tiny_tok, 0)
    ids = tiny_tok.encode(text, add_special_tokens=False)
    assert check.messages("a", 3, SimpleNamespace(message_text=text, messages=honest), ids=ids) == honest  # type: ignore[arg-type]
    assert codec.encoded == 3  # with the text's tokens given: the cut alone
