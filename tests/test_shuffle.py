"""The priming controls: `shuffle` (the relay's tokens) and `generate` with `shuffle: true`
(the written message's tokens), in a seeded order drawn so that the receiver, which encodes
its rendered inbox as one string, reads the same tokens, as many, as of the unshuffled
message; in the embedded runtime and through the distributed request payload."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest
import torch
import yaml

from collective.distributed.payloads import RequestPayload
from collective.lm.models import ModelPool
from collective.records import EVENT_SCHEMA_VERSION, RoundEvent, parse_event
from collective.run.node import relay_text, relayed_ids
from collective.run.runner import prepare, run_prepared
from collective.run.shuffle import shuffle_message, split_framed
from collective.scenario import GenerateMessage, RelayMessage, ShuffleMessage, load_scenario
from tests.test_node import _request, _run
from tests.test_rundir import write_tiny_scenario
from tests.tiny import pydoc_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAME = ("a: ", "\n")


def _read(tok, text: str, frame=FRAME) -> list[int]:
    """What a receiver of the sender's tokenizer reads of a message alone in its inbox."""
    return tok.encode(frame[0] + text + frame[1], add_special_tokens=False)


def _shuffle_request(tok, **changes):
    return replace(_request(tok, message=ShuffleMessage(), budget=12, **changes), message_frame=FRAME)


def _windows(tok, count: int, length: int, seed: int = 0) -> list[str]:
    """`count` texts of `length` stream tokens each at seeded places in the pydoc text, decoded."""
    stream = tok.encode(pydoc_text()[:300_000], add_special_tokens=False)
    draw = random.Random(seed)
    starts = [draw.randrange(len(stream) - length) for _ in range(count)]
    return [tok.decode(stream[s : s + length]) for s in starts]


def _matched_share(tok, texts: list[str], budget: int) -> tuple[float, list[str]]:
    """The share of texts whose shuffle the receiver reads as the same tokens, as many, and the
    texts where the function claimed a match that does not hold (must be none)."""
    matched, false_claims = 0, []
    for index, text in enumerate(texts):
        found = shuffle_message(text, tok, FRAME, budget, torch.Generator().manual_seed(index))
        same = Counter(_read(tok, found.text)) == Counter(_read(tok, text))
        fits = len(tok.encode(found.text, add_special_tokens=False)) <= budget
        matched += same and fits
        if found.matched and not (same and fits):
            false_claims.append(text)
    return matched / len(texts), false_claims


def test_the_receiver_reads_the_shuffle_as_the_relays_tokens_on_many_windows(tiny_tok):
    texts = _windows(tiny_tok, 300, 32)
    share, false_claims = _matched_share(tiny_tok, texts, 64)
    assert false_claims == []
    assert share >= 0.99, share


@pytest.mark.slow
def test_the_receiver_reads_the_shuffle_as_the_relays_tokens_with_smollm2():
    from transformers import AutoTokenizer

    from collective.lm.models import resolve_model_source

    source = resolve_model_source("smollm2-135m")
    if source.kind != "gguf":
        pytest.skip("the smollm2 package is not installed")
    tok = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    share, false_claims = _matched_share(tok, _windows(tok, 300, 32), 64)
    assert false_claims == []
    assert share >= 0.99, share


def test_frame_tokens_merged_into_the_message_stay_at_their_ends():
    # inbox ids: "a", ":", " x" (frame space merged into the message), ..., "y\n" (newline merged)
    assert split_framed([1, 2, 9, 7, 8, 6], [1, 2, 3], [4]) == (3, 1)
    assert split_framed([1, 2, 3, 7, 8, 4], [1, 2, 3], [4]) == (3, 1)  # nothing merged
    assert split_framed([7, 8], [], []) == (0, 0)


def test_a_node_sends_a_shuffle_its_receivers_read_as_its_relay(tiny_lm, tiny_tok):
    requests = [_shuffle_request(tiny_tok, node_id=f"n{k}", prefix=(100 + 37 * k, 130 + 37 * k)) for k in range(6)]
    results = _run(tiny_lm, tiny_tok, requests)
    for request, result in zip(requests, results, strict=True):
        relay = relay_text(request, tiny_tok)
        assert result.message_text is not None and result.message_text != relay
        same = Counter(_read(tiny_tok, result.message_text)) == Counter(_read(tiny_tok, relay))
        assert result.shuffle_matched is same, result.message_text  # the record says whether the match held
        assert len(tiny_tok.encode(result.message_text, add_special_tokens=False)) <= 12
    # the sixth window ('stances, "False" when opt'): no order found within the search budget
    assert [r.shuffle_matched for r in results] == [True] * 5 + [False]


def test_a_relay_records_no_shuffle(tiny_lm, tiny_tok):
    (result,) = _run(tiny_lm, tiny_tok, [_request(tiny_tok, message=RelayMessage(), budget=12)])
    assert result.shuffle_matched is None
    assert result.message_text == tiny_tok.decode(relayed_ids(_request(tiny_tok, message=RelayMessage(), budget=12)))


def test_a_shuffle_is_seeded_per_seed_node_and_round(tiny_lm, tiny_tok):
    def text(**changes):
        return _run(tiny_lm, tiny_tok, [_shuffle_request(tiny_tok, **changes)])[0].message_text

    assert text() == text()
    assert len({text(), text(seed=1), text(node_id="b"), text(round_index=5)}) == 4


def test_a_shuffle_does_not_touch_the_global_rng(tiny_tok):
    torch.manual_seed(0)
    first = shuffle_message(" the cat sat on the mat", tiny_tok, FRAME, 12, torch.Generator().manual_seed(3))
    expected = torch.rand(3)
    torch.manual_seed(0)
    torch.rand(7)  # another state of the global RNG: the same message
    assert shuffle_message(" the cat sat on the mat", tiny_tok, FRAME, 12, torch.Generator().manual_seed(3)) == first
    torch.manual_seed(0)
    shuffle_message(" the cat sat on the mat", tiny_tok, FRAME, 12, torch.Generator().manual_seed(3))
    assert torch.equal(torch.rand(3), expected)


def test_the_written_messages_control_is_the_same_text_shuffled(tiny_lm, tiny_tok):
    written = replace(_request(tiny_tok, message=GenerateMessage(), budget=10), message_frame=FRAME)
    control = replace(written, message=GenerateMessage(shuffle=True))
    plain, shuffled = _run(tiny_lm, tiny_tok, [written, control])
    assert plain.shuffle_matched is None and shuffled.shuffle_matched is True
    assert plain.message_text is not None and shuffled.message_text is not None
    assert shuffled.message_text != plain.message_text
    assert Counter(_read(tiny_tok, shuffled.message_text)) == Counter(_read(tiny_tok, plain.message_text))
    torch.testing.assert_close(plain.collective.target_logprob, shuffled.collective.target_logprob)  # same pass, same row


def test_a_distributed_request_carries_the_shuffle_policy(tiny_lm, tiny_tok):
    request = _shuffle_request(tiny_tok)
    wire = RequestPayload.from_request(request, [], deadline_s=5.0)
    back = RequestPayload.model_validate_json(wire.model_dump_json()).to_request(request.round_index)
    assert isinstance(back.message, ShuffleMessage)
    assert _run(tiny_lm, tiny_tok, [back])[0].message_text == _run(tiny_lm, tiny_tok, [request])[0].message_text


def _messages(folder, model_dir, name, pool):
    shuffle = {"model": "tiny", "message": {"policy": "shuffle"}}
    scenario = load_scenario(write_tiny_scenario(folder, model_dir, name=name, node_defaults=shuffle))
    run_prepared(prepare(scenario, pool, base_dir=folder), folder / name)
    lines = (folder / name / "events.jsonl").read_text(encoding="utf-8").splitlines()
    return [[m.text for m in e.messages if m.sender == "a"] for e in map(parse_event, lines) if isinstance(e, RoundEvent)]


def test_events_record_whether_each_shuffle_matched(tiny_model_dir, tmp_path):
    pool = ModelPool(cache_dir=tmp_path / "cache")
    _messages(tmp_path, tiny_model_dir, "flags", pool)
    lines = (tmp_path / "flags" / "events.jsonl").read_text(encoding="utf-8").splitlines()
    rounds = [e for e in map(parse_event, lines) if isinstance(e, RoundEvent)]
    flags: dict[str, set[bool | None]] = {}
    for event in rounds:
        for node in event.nodes:
            flags.setdefault(node.node_id, set()).add(node.shuffle_matched)
    assert flags.pop("c") == {None}  # the tiny scenario's c relays: nothing shuffled
    assert flags and all(None not in seen and seen for seen in flags.values())  # the others shuffle every round
    assert all(e.schema_version == EVENT_SCHEMA_VERSION for e in rounds)


def test_a_shuffle_run_is_deterministic(tiny_model_dir, tmp_path):
    pool = ModelPool(cache_dir=tmp_path / "cache")
    first, second = _messages(tmp_path, tiny_model_dir, "one", pool), _messages(tmp_path, tiny_model_dir, "two", pool)
    assert first == second
    assert any(texts for texts in first)


def test_a_scenario_accepts_both_priming_controls():
    from collective.scenario import parse_scenario

    data = yaml.safe_load("""
name: s
models: {m: x}
corpus: {train_tokens: 512, eval_tokens: 32}
node_defaults: {model: m, message: {policy: shuffle}}
nodes: [{id: a}, {id: b, message: {policy: generate, shuffle: true}}]
topology: {kind: ring}
""")
    scenario = parse_scenario(data)
    assert isinstance(scenario.node("a").message, ShuffleMessage)
    assert scenario.node("b").message == GenerateMessage(shuffle=True)
