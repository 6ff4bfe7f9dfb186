"""Searched messages in a run (`message.policy: search`): the node's message is searched each
round, within its out-links' budgets, and its objective before and after goes into the
events; receiver-aware searches read the receivers' views; bad settings fail early."""

from __future__ import annotations

from dataclasses import replace

import networkx as nx
import pytest
import torch
import torch.nn.functional as F

from collective.distributed.payloads import RequestPayload
from collective.lm.models import ModelPool
from collective.records import RoundEvent, parse_event
from collective.run.messages import SearchInput, message_frame, search_round_messages
from collective.run.prepared import RunError, check_searched_messages, refuse_receiver_search
from collective.run.runner import prepare, run_prepared
from collective.scenario import SearchMessage, load_scenario
from tests.test_node import _request, _run
from tests.test_rundir import write_tiny_scenario

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEARCH = {"policy": "search", "steps": 2, "search_width": 8, "topk": 8, "ascii_only": False}


def test_the_frame_is_the_inbox_rendering_around_the_text():
    assert message_frame("{sender}: {text}\n", "", "a", 3) == ("a: ", "\n")
    assert message_frame("[{round}] {sender} says {text}.\n", "Inbox:\n", "b", 7) == ("Inbox:\n[7] b says ", ".\n")


def _read_nll(model, tok, frame: tuple[str, str], text: str, span: list[int]) -> float:
    """The mean NLL of `span` for a reader of nothing but the message: [start][its inbox,
    encoded as one string][span], as a receiver reads it (not as the search laid it out)."""
    inbox = tok.encode(frame[0] + text + frame[1], add_special_tokens=False)
    ids = [0, *inbox, *span]  # 0: the tiny tokenizer's <|endoftext|>
    with torch.no_grad():
        log_probs = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    n = len(span)
    return float(-log_probs[len(ids) - n - 1 : len(ids) - 1].gather(1, torch.tensor(span)[:, None]).mean())


def test_a_node_searches_its_message_and_its_receiver_reads_what_was_scored(tiny_lm, tiny_tok, monkeypatch):
    _, tasks = _spy_inputs(monkeypatch)
    spec = SearchMessage(init="relay", steps=3, search_width=16, topk=16, ascii_only=False)
    # the relay 'or\n\nThe exte' starts mid-word: after "a: " a reader reads " or", not " " + "or"
    request = replace(_request(tiny_tok, message=spec, budget=6), message_frame=("a: ", "\n"))
    (result,) = _run(tiny_lm, tiny_tok, [request])
    search = result.message_search
    assert search is not None and search.objective == "sender" and search.steps == 3
    start = tiny_tok.decode(tasks[0].init_ids)
    assert result.message_text is not None and result.message_text != start  # it moved off its start
    assert search.after < search.before - 0.01
    span = request.round_inputs.tolist()  # default span: the round just read
    assert search.after == pytest.approx(_read_nll(tiny_lm, tiny_tok, ("a: ", "\n"), result.message_text, span), abs=1e-4)
    assert search.before == pytest.approx(_read_nll(tiny_lm, tiny_tok, ("a: ", "\n"), start, span), abs=1e-4)
    assert len(tiny_tok.encode(result.message_text, add_special_tokens=False)) <= 6


def _scored_messages(monkeypatch) -> list[list[int]]:
    """Every message (start and candidates) the search scores, spied on its scoring function."""
    import controllers.messages as search_module

    scored: list[list[int]] = []
    real = search_module.candidate_losses

    def spy(model, tasks, candidates, batch_tokens):
        scored.extend(row for block in candidates for row in block.tolist())
        return real(model, tasks, candidates, batch_tokens)

    monkeypatch.setattr(search_module, "candidate_losses", spy)
    return scored


def _item(tok, start: str, frame: tuple[str, str], **changes) -> SearchInput:
    seen = tok.encode(" The return statement leaves the current function call with the value", add_special_tokens=False)
    return SearchInput(
        node_id="a", round_index=3, seed=0, spec=SearchMessage(steps=3, search_width=16, topk=16, ascii_only=False),
        seen_ids=torch.tensor(seen), start_ids=tok.encode(start, add_special_tokens=False), frame=frame, max_bytes=1 << 30,
        **changes,
    )


@pytest.mark.parametrize(
    ("frame", "start"),
    [
        (("s1: ", "\n"), "the cat sat"),  # the frame's space merges into " the"
        (("Inbox:\n", "\n"), "  cat sat"),  # the frame's newline merges with the message's leading spaces
    ],
)
def test_every_message_the_search_scores_is_what_its_reader_reads(tiny_lm, tiny_tok, monkeypatch, frame, start):
    scored = _scored_messages(monkeypatch)
    ((text, record),) = search_round_messages(tiny_lm, tiny_tok, [_item(tiny_tok, start, frame)], start=0, round_tokens=8, batch_tokens=4096)
    before, after = (tiny_tok.encode(t, add_special_tokens=False) for t in frame)
    assert len(scored) > 1  # the start and candidates
    for ids in scored:
        read = tiny_tok.encode(frame[0] + tiny_tok.decode(ids) + frame[1], add_special_tokens=False)
        assert read == [*before, *ids, *after], tiny_tok.decode(ids)
    assert record.tokens == len(tiny_tok.encode(text, add_special_tokens=False))


def test_a_masked_sender_does_not_score_the_positions_it_could_not_see(tiny_lm, tiny_tok, monkeypatch):
    from controllers.messages import IGNORE

    _, tasks = _spy_inputs(monkeypatch)
    placeholder = tiny_tok.encode("_", add_special_tokens=False)[0]
    item = _item(tiny_tok, " a b c", ("a: ", "\n"))
    seen = item.seen_ids.clone()
    seen[[-1, -3, -4]] = placeholder  # the round's last 8 tokens, three of them hidden
    item = replace(item, seen_ids=seen, placeholder_id=placeholder)
    search_round_messages(tiny_lm, tiny_tok, [item], start=0, round_tokens=8, batch_tokens=4096)
    (part,) = tasks[0].parts
    span = seen[-8:].tolist()
    assert part.rest_ids[-8:] == span  # the reader reads the placeholders...
    assert part.labels == [IGNORE if t == placeholder else t for t in span]  # ...but is not scored on them
    assert part.labels.count(IGNORE) == 3


def _spy_inputs(monkeypatch):
    """The SearchInput items compute_rounds hands to the search, and the tasks it builds."""
    import collective.run.messages as messages_module
    import collective.run.node as node_module

    items, tasks = [], []
    real_round, real_search = node_module.search_round_messages, messages_module.search_messages

    def round_spy(model, tokenizer, given, **kwargs):
        items.extend(given)
        return real_round(model, tokenizer, given, **kwargs)

    def search_spy(model, tokenizer, given, config, **kwargs):
        tasks.extend(given)
        return real_search(model, tokenizer, given, config, **kwargs)

    monkeypatch.setattr(node_module, "search_round_messages", round_spy)
    monkeypatch.setattr(messages_module, "search_messages", search_spy)
    return items, tasks


def test_a_searched_message_is_seeded_per_seed_node_and_round(tiny_lm, tiny_tok, monkeypatch):
    _, tasks = _spy_inputs(monkeypatch)
    spec = SearchMessage(steps=1, search_width=4, topk=4, ascii_only=False)
    requests = [
        _request(tiny_tok, message=spec, budget=4),
        _request(tiny_tok, message=spec, budget=4),
        _request(tiny_tok, message=spec, budget=4, seed=1),
        _request(tiny_tok, "b", message=spec, budget=4),
        _request(tiny_tok, message=spec, budget=4, round_index=5),
    ]
    texts = [_run(tiny_lm, tiny_tok, [r])[0].message_text for r in requests]
    seeds = [task.seed for task in tasks]
    assert seeds[0] == seeds[1] and texts[0] == texts[1]  # the same request, the same search
    assert len(set(seeds[1:])) == 4  # another seed, node or round: another generator


def test_each_start_the_search_can_take(tiny_lm, tiny_tok, monkeypatch):
    from collective.run.messages import filler_ids, stable_ids
    from collective.run.node import relayed_ids
    from collective.scenario import RelayMessage

    items, _ = _spy_inputs(monkeypatch)
    starts = {}
    for init in ("relay", "generate", "filler"):
        spec = SearchMessage(init=init, steps=1, search_width=4, topk=4, ascii_only=False)
        (result,) = _run(tiny_lm, tiny_tok, [_request(tiny_tok, message=spec, budget=5)])
        assert result.message_search is not None and result.message_search.tokens <= 5, init
        starts[init] = items[-1].start_ids
    relay = relayed_ids(_request(tiny_tok, message=RelayMessage(), budget=5))
    assert starts["relay"] == stable_ids(relay, tiny_tok, 5)
    assert starts["filler"] == filler_ids(tiny_tok, 5)
    assert starts["generate"] not in (starts["relay"], starts["filler"])


def _run_events(folder, model_dir, name, **changes):
    scenario = load_scenario(write_tiny_scenario(folder, model_dir, name=name, **changes))
    pool = ModelPool(cache_dir=folder / "cache")
    run_prepared(prepare(scenario, pool, base_dir=folder), folder / name)
    lines = (folder / name / "events.jsonl").read_text(encoding="utf-8").splitlines()
    return [e for e in map(parse_event, lines) if isinstance(e, RoundEvent)]


@pytest.mark.parametrize("objective", ["sender", "receiver"])
def test_a_run_records_every_searched_message(tiny_model_dir, tiny_tok, tmp_path, objective):
    defaults = {"model": "tiny", "message": {**SEARCH, "objective": objective}}
    events = _run_events(tmp_path, tiny_model_dir, f"search-{objective}", node_defaults=defaults)
    searches = [n.message_search for e in events for n in e.nodes if n.node_id != "c"]  # c relays (its own setting)
    assert len(searches) == 2 * len(events)
    assert all(s is not None and s.objective == objective for s in searches)
    assert sum(s.after < s.before - 1e-6 for s in searches if s is not None) >= len(searches) // 2  # most searches move
    for event in events:
        for message, node in ((m, n) for m in event.messages for n in event.nodes if n.node_id == m.sender != "c"):
            frame = message_frame("{sender}: {text}\n", "", message.sender, event.round_index)  # the bus's defaults
            before, after = (tiny_tok.encode(t, add_special_tokens=False) for t in frame)
            read = tiny_tok.encode(frame[0] + message.text + frame[1], add_special_tokens=False)
            assert read[: len(before)] == before and read[len(read) - len(after) :] == after
            assert node.message_search is not None and len(read) - len(before) - len(after) == node.message_search.tokens
    assert all(n.message_search is None for e in events for n in e.nodes if n.node_id == "c")
    for event in events:
        for message in event.messages:
            assert message.n_tokens <= 4 and not message.truncated  # searched within the budget: sent whole


def test_the_receiver_objective_reads_the_receivers_views(tiny_model_dir, tmp_path, monkeypatch):
    items, _ = _spy_inputs(monkeypatch)
    defaults = {"model": "tiny", "message": {**SEARCH, "objective": "receiver"}}
    _run_events(tmp_path, tiny_model_dir, "receivers", node_defaults=defaults)
    assert items
    for item in items:
        assert sorted(r.node_id for r in item.receivers) == {"a": ["b", "c"], "b": ["a", "c"]}[item.node_id]
        # a: window 16, b: 8 tokens lagged 8, c: no view (write_tiny_scenario), all before the round read
        lengths = {r.node_id: len(r.prefix_ids) for r in item.receivers}
        assert lengths == {n: {"a": 16, "b": 8, "c": 0}[n] for n in lengths}


def _scenario_with(tmp_path, tiny_model_dir, **changes):
    return load_scenario(write_tiny_scenario(tmp_path, tiny_model_dir, **changes))


def test_a_search_over_a_link_with_no_room_is_refused(tmp_path, tiny_model_dir):
    scenario = _scenario_with(
        tmp_path, tiny_model_dir, node_defaults={"model": "tiny", "message": SEARCH},
        bus={"round_tokens": 8, "max_message_tokens": 4, "links": [{"source": "a", "target": "b", "max_message_tokens": 0}]},
    )
    graph = nx.DiGraph([("a", "b"), ("b", "a"), ("a", "c"), ("c", "a"), ("b", "c"), ("c", "b")])
    with pytest.raises(RunError, match=r"nodes\[0\]\.message .*a -> b has a budget of 0 tokens"):
        check_searched_messages(scenario, graph)


def test_a_search_with_no_reader_is_refused(tmp_path, tiny_model_dir):
    scenario = _scenario_with(tmp_path, tiny_model_dir, node_defaults={"model": "tiny", "message": SEARCH})
    graph = nx.DiGraph([("a", "b"), ("a", "c"), ("c", "a"), ("c", "b")])  # b reads but has no one to tell
    with pytest.raises(RunError, match=r"nodes\[1\]\.message \(node 'b', policy search\): the node has no out-links"):
        check_searched_messages(scenario, graph)


def test_a_distributed_run_refuses_the_receiver_objective(tmp_path, tiny_model_dir):
    receiver = _scenario_with(tmp_path, tiny_model_dir, node_defaults={"model": "tiny", "message": {**SEARCH, "objective": "receiver"}})
    with pytest.raises(RunError, match=r"nodes\[0\]\.message\.objective .*use `objective: sender`"):
        refuse_receiver_search(receiver)
    refuse_receiver_search(_scenario_with(tmp_path, tiny_model_dir, node_defaults={"model": "tiny", "message": SEARCH}))


def test_a_distributed_request_carries_what_the_search_needs(tiny_tok):
    request = _request(tiny_tok, message=SearchMessage(steps=1), budget=6)
    request = type(request)(**{**request.__dict__, "message_bytes": 17, "message_frame": ("x: ", "|\n"), "placeholder_id": 62})
    wire = RequestPayload.from_request(request, [], deadline_s=5.0)
    back = RequestPayload.model_validate_json(wire.model_dump_json()).to_request(request.round_index)
    assert isinstance(back.message, SearchMessage)
    assert back.message_bytes == 17 and back.message_frame == ("x: ", "|\n")
    assert back.placeholder_id == 62  # a masked volunteer leaves out the same labels as the embedded run


def test_the_report_summarizes_each_nodes_searched_messages(tiny_model_dir, tmp_path):
    from collective.records import Report
    from collective.report.report_view import report_markdown

    defaults = {"model": "tiny", "message": SEARCH}
    events = _run_events(tmp_path, tiny_model_dir, "summary", node_defaults=defaults)
    report = Report.model_validate_json((tmp_path / "summary" / "report.json").read_text(encoding="utf-8"))
    assert sorted(report.message_searches) == ["a", "b"]
    for node_id, found in report.message_searches.items():
        mine = [n.message_search for e in events for n in e.nodes if n.node_id == node_id]
        assert found.messages == len(mine) == len(events)
        assert found.mean_before == pytest.approx(sum(s.before for s in mine) / len(mine))
        assert found.mean_after == pytest.approx(sum(s.after for s in mine) / len(mine))
        assert found.mean_after < found.mean_before  # the searches moved, on average
    assert "messages of a: searched: objective" in report_markdown(report)
