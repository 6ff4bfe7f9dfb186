"""Hostile nodes (`message.policy: attack`): the message is searched to hurt its readers,
within the out-links' budgets, under each threat model; bad settings fail before the run.

The untargeted attack's proxy (the readers' NLL of the round the attacker just read) says
nothing of the coming round on a random tiny model, whose predictions of one stretch of
text tell nothing about the next. The run tests therefore read a periodic text (one
8-token line, repeated; 8 tokens a round): there the coming round is the round just read,
every view is the same each round, and the attack's objective is what its readers will
score, so that the test measures the search and its wiring, not the proxy."""

from __future__ import annotations

from dataclasses import replace

import networkx as nx
import pytest
import torch

import collective.run.messages as messages_module
import controllers.messages as controller_messages
from collective.distributed.payloads import RequestPayload
from collective.lm.codec import start_token
from collective.lm.models import ModelPool
from collective.records import Report, RoundEvent, parse_event
from collective.run.messages import ReceiverContext
from collective.run.node import relayed_ids
from collective.run.prepared import (
    RunError,
    check_attack_targets,
    check_searched_messages,
    refuse_receiver_search,
)
from collective.run.runner import prepare, run_prepared
from collective.scenario import AttackMessage, RelayMessage, load_scenario
from controllers.messages import (
    MessagePart,
    MessageSearchConfig,
    MessageTask,
    message_gradients,
    message_losses,
    search_messages,
)
from tests.test_node import _request, _run
from tests.test_rundir import write_tiny_scenario
from tests.tiny import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEARCH = {"steps": 4, "search_width": 16, "topk": 16, "ascii_only": False}
ATTACK = {"policy": "attack", **SEARCH}
LINE = "A list of names.\n"  # 8 tokens for the tiny tokenizer, and the same 8 every repetition
READERS = ("b", "c", "d")


# ---------------------------------------------------------------------------- the search's bounds


def _reader_part(tok, weight: float = -1.0) -> MessagePart:
    rest = tok.encode("\nA list of the names in the module.", add_special_tokens=False)
    return MessagePart([0], rest, rest[-6:], weight)


def test_an_untargeted_objective_counts_each_tokens_nll_at_most_the_cap(tiny_lm, tiny_tok):
    message = tiny_tok.encode(" x y", add_special_tokens=False)
    part = _reader_part(tiny_tok)
    ids = [*part.prefix_ids, *message, *part.rest_ids]
    with torch.no_grad():
        log_probs = tiny_lm(torch.tensor([ids])).logits[0].log_softmax(-1)  # (L, V)
    nll = -log_probs[len(ids) - 7 : len(ids) - 1].gather(1, torch.tensor(part.labels)[:, None]).squeeze(1)  # (6,)
    ordered = nll.sort().values  # (6,)
    # a cap between the two largest NLLs cuts exactly one token, by a known amount; one below every NLL
    # makes each token count the cap (a cap on the mean, on the wrong positions, or none fails one of these)
    one_cut, all_cut = float(ordered[-2] + ordered[-1]) / 2, float(ordered[0]) / 2
    assert float(ordered[-1] - ordered[-2]) > 1e-3  # the two largest differ: the first cap cuts one token
    tasks = [MessageTask([replace(part, max_nll=cap)], message, 0) for cap in (None, one_cut, all_cut)]
    plain, capped, floored = message_losses(tiny_lm, tasks, [message] * 3)
    assert float(plain) == pytest.approx(-float(nll.mean()), abs=1e-5)
    cut = (float(ordered[-1]) - one_cut) / 6  # the largest token's excess over the cap, over the 6 labels
    assert float(capped) == pytest.approx(float(plain) + cut, abs=1e-5) and cut > 1e-4
    assert float(floored) == pytest.approx(-all_cut, abs=1e-5)
    (grad,) = message_gradients(tiny_lm, [MessageTask([replace(part, max_nll=1e-3)], message, 0)], [torch.tensor(message)])
    assert not bool(grad.any())  # every token beyond the cap: nothing left to push


@pytest.mark.parametrize("start_is_nan", [False, True])
def test_a_message_the_model_scores_nan_is_never_taken(tiny_lm, tiny_tok, monkeypatch, start_is_nan):
    """NaN scores become +inf where every message is scored (`candidate_losses`): the start
    (then any finite candidate beats it) and each step's best candidate (then the next best
    is taken)."""
    real, calls = controller_messages.row_losses, []

    def best_is_nan(*args, **kwargs):
        nll = real(*args, **kwargs)
        calls.append(len(calls))
        if len(calls) > 1 or start_is_nan:
            nll[nll.argmin()] = float("nan")
        return nll

    monkeypatch.setattr(controller_messages, "row_losses", best_is_nan)
    task = MessageTask([_reader_part(tiny_tok, weight=1.0)], tiny_tok.encode(" x y z", add_special_tokens=False), 0)
    (result,) = search_messages(tiny_lm, tiny_tok, [task], MessageSearchConfig(steps=3, search_width=16, topk=16))
    assert all(loss == loss for loss in result.losses)  # no NaN kept
    assert result.loss < result.initial_loss  # the next best candidates were taken


# ---------------------------------------------------------------------------- runs


def _nodes(attacker_message: dict) -> list[dict]:
    """A star: the attacker `a` at the centre, three readers with different views."""
    return [
        {"id": "a", "view": {"kind": "window", "tokens": 16}, "message": attacker_message},
        {"id": "b", "view": {"kind": "lagged", "tokens": 8, "lag": 8}},
        {"id": "c", "view": {"kind": "window", "tokens": 12}},
        {"id": "d", "view": {"kind": "none"}},
    ]


def _scenario(folder, model_dir, name, attacker_message, **changes):
    text = folder / "periodic.txt"
    text.write_text(LINE * 60, encoding="utf-8")
    return load_scenario(
        write_tiny_scenario(
            folder, model_dir, name=name, nodes=_nodes(attacker_message), topology={"kind": "star"},
            corpus={"source": "file", "path": str(text), "train_tokens": 48, "eval_tokens": 24},
            node_defaults={"model": "tiny", "message": {"policy": "silent"}}, **changes,
        )
    )


def _run_scenario(folder, scenario, name):
    prepared = prepare(scenario, ModelPool(cache_dir=folder / "cache"), base_dir=folder)
    run_prepared(prepared, folder / name)
    report = Report.model_validate_json((folder / name / "report.json").read_text(encoding="utf-8"))
    lines = (folder / name / "events.jsonl").read_text(encoding="utf-8").splitlines()
    return prepared, report, [e for e in map(parse_event, lines) if isinstance(e, RoundEvent)]


def _readers_nll(report: Report) -> float:
    return sum(report.row("member_collective", n).nll for n in READERS) / len(READERS)


def test_an_untargeted_attack_raises_its_readers_nll_against_a_silent_attacker(tiny_model_dir, tmp_path):
    _, silent, _ = _run_scenario(tmp_path, _scenario(tmp_path, tiny_model_dir, "silent", {"policy": "silent"}), "silent")
    _, relay, _ = _run_scenario(tmp_path, _scenario(tmp_path, tiny_model_dir, "relay", {"policy": "relay"}), "relay")
    _, attack, events = _run_scenario(tmp_path, _scenario(tmp_path, tiny_model_dir, "attack", ATTACK), "attack")
    damage = _readers_nll(attack) - _readers_nll(silent)
    assert damage > 0.3, damage  # nats per token (about 0.9 here)
    assert _readers_nll(attack) > _readers_nll(relay) + 0.3  # not just any message: the start it searched from
    assert all(attack.row("member_isolated", n).nll == silent.row("member_isolated", n).nll for n in "abcd")
    searches = [n.message_search for e in events for n in e.nodes if n.node_id == "a"]
    assert len(searches) == len(events) and all(s is not None for s in searches)
    assert all(s.objective == "untargeted" and s.after > s.before for s in searches if s is not None)
    # the record is the readers' NLL of the span; on this text, what they score the next round
    for event, search in zip(events[1:], searches):
        readers = [n.nll_collective for n in event.nodes if n.node_id in READERS]
        assert search is not None and sum(readers) / len(readers) == pytest.approx(search.after, abs=1e-3)
    assert searches[0] is not None and searches[0].before == pytest.approx(_readers_nll(relay), abs=1e-3)


def _spy(monkeypatch) -> list[tuple[object, list[MessageTask]]]:
    """The model and the tasks of every message search."""
    calls, real = [], messages_module.search_messages

    def spy(model, tokenizer, tasks, config, **kwargs):
        calls.append((model, list(tasks)))
        return real(model, tokenizer, tasks, config, **kwargs)

    monkeypatch.setattr(messages_module, "search_messages", spy)
    return calls


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory):
    """Another tiny Llama (other weights, wider) with the same tokenizer."""
    folder = tmp_path_factory.mktemp("second-model")
    tok = tiny_tokenizer()
    tiny_llama(len(tok), seed=1, hidden_size=48).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _two_models(model_dir, other_dir) -> dict:
    spec = {"dtype": "float32", "device": "cpu"}
    return {"tiny": {"ref": str(model_dir), **spec}, "other": {"ref": str(other_dir), **spec}}


@pytest.mark.parametrize("threat", ["model-only", "transfer"])
def test_each_threat_model_searches_what_it_may_know(tiny_model_dir, second_model_dir, tmp_path, monkeypatch, threat):
    calls = _spy(monkeypatch)
    message = {**ATTACK, "threat": threat, **({"search_model": "other"} if threat == "transfer" else {})}
    scenario = _scenario(tmp_path, tiny_model_dir, threat, message, models=_two_models(tiny_model_dir, second_model_dir))
    prepared, _, events = _run_scenario(tmp_path, scenario, threat)
    searcher = prepared.models["other" if threat == "transfer" else "tiny"].model
    assert len(calls) == len(events) and all(model is searcher and len(tasks) == 1 for model, tasks in calls)
    tok = prepared.tokenizer
    for task in (task for _, tasks in calls for task in tasks):  # one reader standing in for all: no control, the attacker's own view before the span
        (part,) = task.parts
        assert part.weight == -1.0 and part.max_nll is not None
        assert part.prefix_ids == [start_token(tok), *tok.encode("a: ", add_special_tokens=False)]
        assert part.rest_ids == [*tok.encode("\n", add_special_tokens=False), *part.labels * 3]  # a's 16-token view, the span
    searches = [n.message_search for e in events for n in e.nodes if n.node_id == "a"]
    assert len(searches) == len(events)
    assert all(s is not None and s.objective == "untargeted" and 0 < s.before < s.after for s in searches)


# ---------------------------------------------------------------------------- one round


def _log_prob(model, ids: list[int], token: int) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return float(logits.log_softmax(-1)[token])


def test_a_targeted_attack_raises_the_targets_probability_in_its_reader(tiny_lm, tiny_tok):
    target = " the"
    spec = AttackMessage(objective="targeted", target=target, threat="white-box", **SEARCH)
    request = _request(tiny_tok, message=spec, budget=4)
    reader = ReceiverContext("b", tiny_tok.encode(" Note:", add_special_tokens=False), request.prefix_ids[-12:])
    request = replace(request, receivers=(reader,), message_frame=("a: ", "\n"))
    (result,) = _run(tiny_lm, tiny_tok, [request])
    search = result.message_search
    assert search is not None and search.objective == "targeted" and search.after < search.before
    assert result.message_text is not None and len(tiny_tok.encode(result.message_text)) <= 4

    def reader_log_prob(text: str) -> float:
        encode = lambda s: tiny_tok.encode(s, add_special_tokens=False)  # noqa: E731
        context = [start_token(tiny_tok), *reader.control_ids, *encode("a: "), *encode(text), *encode("\n"), *reader.prefix_ids.tolist()]
        return _log_prob(tiny_lm, context, encode(target)[0])

    relay = tiny_tok.decode(relayed_ids(replace(request, message=RelayMessage())))
    assert reader_log_prob(result.message_text) > reader_log_prob(relay) + 1.0
    assert reader_log_prob(result.message_text) == pytest.approx(-search.after, abs=1e-4)  # a one-token target


# ---------------------------------------------------------------------------- bad input


def _plain_scenario(tmp_path, model_dir, message, **changes):
    return load_scenario(write_tiny_scenario(tmp_path, model_dir, node_defaults={"model": "tiny", "message": message}, **changes))


def test_an_attacker_with_no_reader_or_no_room_is_refused(tmp_path, tiny_model_dir):
    scenario = _plain_scenario(tmp_path, tiny_model_dir, ATTACK)
    graph = nx.DiGraph([("a", "b"), ("a", "c"), ("c", "a"), ("c", "b")])  # b reads but tells no one
    with pytest.raises(RunError, match=r"nodes\[1\]\.message \(node 'b', policy attack\): the node has no out-links"):
        check_searched_messages(scenario, graph)
    narrow = _plain_scenario(
        tmp_path, tiny_model_dir, ATTACK,
        bus={"round_tokens": 8, "max_message_tokens": 4, "links": [{"source": "a", "target": "b", "max_message_bytes": 0}]},
    )
    with pytest.raises(RunError, match=r"nodes\[0\]\.message \(node 'a', policy attack\): the link a -> b .* 0 bytes"):
        check_searched_messages(narrow, nx.DiGraph([("a", "b"), ("b", "a"), ("c", "a")]))


class _LossyCodec:
    """A tokenizer that loses some texts: encodes "nothing" to no token, lower-cases the rest."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [] if text == "nothing" else [ord(ch) for ch in text.lower()]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(map(chr, ids))


def test_a_target_the_tokenizer_cannot_encode_is_refused(tmp_path, tiny_model_dir, tiny_tok):
    def targeted(target: str):
        return _plain_scenario(tmp_path, tiny_model_dir, {**ATTACK, "objective": "targeted", "target": target})

    check_attack_targets(targeted(" names"), tiny_tok)
    with pytest.raises(RunError, match=r"nodes\[0\]\.message\.target \(node 'a'\): '<\|endoftext\|>' encodes to 1 token.* read back as ''.*plain text"):
        check_attack_targets(targeted("<|endoftext|>"), tiny_tok)
    with pytest.raises(RunError, match=r"nodes\[0\]\.message\.target .*'nothing' encodes to no token"):
        check_attack_targets(targeted("nothing"), _LossyCodec())  # type: ignore[arg-type]
    with pytest.raises(RunError, match=r"nodes\[0\]\.message\.target .*'Names' encodes to 5 token\(s\) that read back as 'names'"):
        check_attack_targets(targeted("Names"), _LossyCodec())  # type: ignore[arg-type]
    with pytest.raises(RunError, match=r"nodes\[0\]\.message\.target"):
        prepare(targeted("<|endoftext|>"), ModelPool(cache_dir=tmp_path / "cache"), base_dir=tmp_path)


def test_a_transfer_attack_on_another_tokenizer_is_refused(tmp_path, tiny_model_dir):
    other = tmp_path / "other-tokenizer"
    tok = tiny_tokenizer(600)
    tiny_llama(len(tok), seed=1).save_pretrained(other)
    tok.save_pretrained(other)
    scenario = _plain_scenario(
        tmp_path, tiny_model_dir, {**ATTACK, "threat": "transfer", "search_model": "other"},
        models=_two_models(tiny_model_dir, other),
    )
    with pytest.raises(RunError, match=r"nodes\[0\]\.message\.search_model .*'other' and the readers' model 'tiny' do not share a tokenizer"):
        prepare(scenario, ModelPool(cache_dir=tmp_path / "cache"), base_dir=tmp_path)


def test_a_distributed_run_refuses_white_box_and_transfer_attacks(tmp_path, tiny_model_dir, second_model_dir):
    models = _two_models(tiny_model_dir, second_model_dir)
    for threat, why in (("white-box", "readers' own views"), ("transfer", "second model")):
        message = {**ATTACK, "threat": threat, **({"search_model": "other"} if threat == "transfer" else {})}
        with pytest.raises(RunError, match=rf"nodes\[0\]\.message\.threat \(node 'a'\): `{threat}` .*{why}.*`threat: model-only`"):
            refuse_receiver_search(_plain_scenario(tmp_path, tiny_model_dir, message, models=models))
    refuse_receiver_search(_plain_scenario(tmp_path, tiny_model_dir, {**ATTACK, "threat": "model-only"}))


def test_a_distributed_node_searches_a_model_only_attack_with_what_it_holds(tiny_lm, tiny_tok):
    """A volunteer gets the request over the wire (no readers' views, no second model) and
    searches the attack on its own model and view."""
    request = _request(tiny_tok, message=AttackMessage(threat="model-only", **SEARCH), budget=4)
    readers = (ReceiverContext("b", [1, 2], request.prefix_ids),)  # what only an embedded engine could fill in
    wire = RequestPayload.from_request(replace(request, receivers=readers), [], deadline_s=5.0)
    back = RequestPayload.model_validate_json(wire.model_dump_json()).to_request(request.round_index)
    assert back.message == request.message and back.receivers == ()  # the readers' views never travel
    (result,) = _run(tiny_lm, tiny_tok, [back])  # compute_rounds without search_models, as a volunteer calls it
    search = result.message_search
    assert search is not None and search.objective == "untargeted" and 0 < search.before < search.after
    assert result.message_text is not None and len(tiny_tok.encode(result.message_text)) <= 4
