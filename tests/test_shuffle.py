"""The priming control `shuffle`: the relay's tokens, in a seeded order that says nothing
of theirs, in the embedded runtime and through the distributed request payload."""

from __future__ import annotations

from collections import Counter

import pytest
import yaml

from collective.distributed.payloads import RequestPayload
from collective.lm.models import ModelPool
from collective.records import RoundEvent, parse_event
from collective.run.node import relayed_ids
from collective.run.runner import prepare, run_prepared
from collective.scenario import RelayMessage, ShuffleMessage, load_scenario
from tests.test_node import _request, _run
from tests.test_rundir import write_tiny_scenario

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_shuffle_has_the_relays_tokens_in_another_order(tiny_tok):
    relay = relayed_ids(_request(tiny_tok, message=RelayMessage(), budget=12))
    shuffled = relayed_ids(_request(tiny_tok, message=ShuffleMessage(), budget=12))
    assert len(shuffled) == len(relay) == 12
    assert Counter(shuffled) == Counter(relay)
    assert shuffled != relay


def test_a_shuffle_is_seeded_per_seed_node_and_round(tiny_tok):
    def ids(**changes):
        return relayed_ids(_request(tiny_tok, message=ShuffleMessage(), budget=20, **changes))

    assert ids() == ids()
    assert ids(seed=1) != ids()
    assert ids(node_id="b") != ids()
    assert ids(round_index=5) != ids()


def test_a_shuffle_does_not_touch_the_global_rng(tiny_tok):
    import torch

    torch.manual_seed(0)
    first = relayed_ids(_request(tiny_tok, message=ShuffleMessage(), budget=20))
    expected = torch.rand(3)
    torch.manual_seed(0)
    torch.rand(7)  # another state of the global RNG: the same message
    assert relayed_ids(_request(tiny_tok, message=ShuffleMessage(), budget=20)) == first
    torch.manual_seed(0)
    relayed_ids(_request(tiny_tok, message=ShuffleMessage(), budget=20))
    assert torch.equal(torch.rand(3), expected)


def test_the_node_sends_the_shuffled_tokens_as_its_message(tiny_lm, tiny_tok):
    request = _request(tiny_tok, message=ShuffleMessage(), budget=10)
    (result,) = _run(tiny_lm, tiny_tok, [request])
    assert result.message_text == tiny_tok.decode(relayed_ids(request))


def test_a_distributed_request_carries_the_shuffle_policy(tiny_tok):
    request = _request(tiny_tok, message=ShuffleMessage(), budget=10)
    wire = RequestPayload.from_request(request, [], deadline_s=5.0)
    back = RequestPayload.model_validate_json(wire.model_dump_json()).to_request(request.round_index)
    assert isinstance(back.message, ShuffleMessage)
    assert relayed_ids(back) == relayed_ids(request)


def _messages(folder, model_dir, name, pool):
    shuffle = {"model": "tiny", "message": {"policy": "shuffle"}}
    scenario = load_scenario(write_tiny_scenario(folder, model_dir, name=name, node_defaults=shuffle))
    run_prepared(prepare(scenario, pool, base_dir=folder), folder / name)
    lines = (folder / name / "events.jsonl").read_text(encoding="utf-8").splitlines()
    return [[m.text for m in e.messages if m.sender == "a"] for e in map(parse_event, lines) if isinstance(e, RoundEvent)]


def test_a_shuffle_run_is_deterministic(tiny_model_dir, tmp_path):
    pool = ModelPool(cache_dir=tmp_path / "cache")
    first, second = _messages(tmp_path, tiny_model_dir, "one", pool), _messages(tmp_path, tiny_model_dir, "two", pool)
    assert first == second
    assert any(texts for texts in first)


def test_a_scenario_accepts_the_shuffle_policy():
    from collective.scenario import parse_scenario

    data = yaml.safe_load("""
name: s
models: {m: x}
corpus: {train_tokens: 512, eval_tokens: 32}
node_defaults: {model: m, message: {policy: shuffle}}
nodes: [{id: a}, {id: b}]
topology: {kind: ring}
""")
    assert isinstance(parse_scenario(data).node("a").message, ShuffleMessage)
