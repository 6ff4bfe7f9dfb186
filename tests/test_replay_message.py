"""`replay`: a written message's priming control matched across runs. A replay of a finished
run sends, round by round, the text each node sent there; verbatim, the receivers read
exactly what they read in that run, so every collective number is that run's; shuffled,
they read the same tokens in another order."""

from __future__ import annotations

from collections import Counter

import pytest

from collective.lm.models import ModelPool
from collective.records import RoundEvent, parse_event
from collective.run.prepared import RunError
from collective.run.runner import prepare, run_prepared
from collective.scenario import load_scenario
from tests.test_rundir import write_tiny_scenario

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WRITERS = ("a", "b")  # the tiny scenario's generating nodes (c relays)


def _run(folder, model_dir, pool, name, **changes):
    scenario = load_scenario(write_tiny_scenario(folder, model_dir, name=name, **changes))
    run_prepared(prepare(scenario, pool, base_dir=folder), folder / name)
    lines = (folder / name / "events.jsonl").read_text(encoding="utf-8").splitlines()
    return [e for e in map(parse_event, lines) if isinstance(e, RoundEvent)]


def _replaying(shuffle: bool, run: str) -> dict:
    message = {"policy": "replay", "run": run, "shuffle": shuffle}
    return {"nodes": [
        {"id": "a", "view": {"kind": "window", "tokens": 16}, "message": message},
        {"id": "b", "view": {"kind": "lagged", "tokens": 8, "lag": 8}, "message": message},
        {"id": "c", "view": {"kind": "none"}, "message": {"policy": "relay"}},
    ]}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("replay")
    pool = ModelPool(cache_dir=folder / "cache")
    plain = _run(folder, tiny_model_dir, pool, "plain")
    verbatim = _run(folder, tiny_model_dir, pool, "verbatim", **_replaying(False, "plain"))
    shuffled = _run(folder, tiny_model_dir, pool, "shuffled", **_replaying(True, str(folder / "plain")))
    return folder, pool, plain, verbatim, shuffled


def _sent(events, node):
    return [next(n.last_message for n in e.nodes if n.node_id == node) for e in events]


def test_a_verbatim_replay_sends_the_same_text_and_gives_the_same_numbers(runs):
    _, _, plain, verbatim, _ = runs
    for node in WRITERS:
        assert _sent(verbatim, node) == _sent(plain, node)
        assert any(_sent(plain, node))
    # the receivers read exactly what they read in the plain run: the same predictions
    assert [e.nll_collective for e in verbatim] == [e.nll_collective for e in plain]
    assert [[n.nll_collective for n in e.nodes] for e in verbatim] == [[n.nll_collective for n in e.nodes] for e in plain]


def test_a_shuffled_replay_sends_the_plain_runs_words_in_another_order(runs):
    _, _, plain, _, shuffled = runs
    reordered = 0
    for node in WRITERS:
        for was, now in zip(_sent(plain, node), _sent(shuffled, node)):
            assert (was is None) == (now is None)
            if was:
                assert Counter(was.split()) == Counter(now.split()) or Counter(was) == Counter(now)
                reordered += was != now
    assert reordered  # the shuffle moved something
    flags = {n.shuffle_matched for e in shuffled for n in e.nodes if n.node_id in WRITERS and n.last_message}
    assert flags and None not in flags


def test_a_replay_of_another_stream_is_refused_naming_the_field(runs, tiny_model_dir):
    folder, pool, _, _, _ = runs
    scenario = load_scenario(write_tiny_scenario(
        folder, tiny_model_dir, name="other", corpus={"source": "builtin:pydoc", "train_tokens": 56, "eval_tokens": 24},
        **_replaying(True, "plain"),
    ))
    with pytest.raises(RunError, match=r"nodes\[a\]\.message\.run: .*corpus\.train_tokens: 48 there, 56 here"):
        prepare(scenario, pool, base_dir=folder)


def test_a_replay_of_a_missing_run_is_refused(runs, tiny_model_dir):
    folder, pool, _, _, _ = runs
    scenario = load_scenario(write_tiny_scenario(folder, tiny_model_dir, name="missing", **_replaying(True, "nowhere")))
    with pytest.raises(RunError, match=r"nodes\[a\]\.message\.run: .*nowhere is not a run folder"):
        prepare(scenario, pool, base_dir=folder)


def test_a_distributed_request_carries_the_replayed_text(tiny_lm, tiny_tok):
    from dataclasses import replace

    from collective.distributed.payloads import RequestPayload
    from collective.scenario import ReplayMessage
    from tests.test_node import _request
    from tests.test_node import _run as compute

    request = replace(_request(tiny_tok, message=ReplayMessage(run="x", shuffle=False), budget=12), replay_text=" the cat sat")
    wire = RequestPayload.from_request(request, [], deadline_s=5.0)
    back = RequestPayload.model_validate_json(wire.model_dump_json()).to_request(request.round_index)
    assert back.replay_text == " the cat sat" and isinstance(back.message, ReplayMessage)
    assert compute(tiny_lm, tiny_tok, [back])[0].message_text == " the cat sat"
