"""Byte-unit runs (collective/run/byte_mode.py): nodes whose models have different tokenizers
read the same bytes, every row is a next-byte distribution and the pools are exact."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from collective.lm.byte_rows import vocab_of
from collective.lm.models import ModelPool
from collective.records import RoundEvent, parse_event
from collective.run.control import search_controls
from collective.run.engine import EmbeddedExecutor, RoundEngine
from collective.run.prepared import RunError
from collective.run.runner import prepare, run_prepared
from collective.scenario import load_scenario
from tests.test_bytes import byte_fallback_tokenizer
from tests.test_rundir import write_tiny_scenario
from tests.tiny import tiny_gemma3, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROUND, EVAL_ROUNDS = 8, 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bytes")
    small = root / "small"
    tok = tiny_tokenizer(512)
    tiny_llama(len(tok), seed=0).save_pretrained(small)
    tok.save_pretrained(small)
    gemma = root / "gemma"
    sp = byte_fallback_tokenizer()
    tiny_gemma3(len(sp), seed=5).save_pretrained(gemma)
    sp.save_pretrained(gemma)
    return {"root": root, "small": small, "gemma": gemma}


def _scenario(folders: dict[str, Path], name: str, **changes) -> Path:
    models = {
        "small": {"ref": str(folders["small"]), "dtype": "float32", "device": "cpu"},
        "gemma": {"ref": str(folders["gemma"]), "dtype": "float32", "device": "cpu"},
    }
    data = {
        "models": models,
        "nodes": [
            {"id": "a", "model": "small", "view": {"kind": "window", "tokens": 16}},
            {"id": "b", "model": "gemma", "view": {"kind": "lagged", "tokens": 8, "lag": 8}},
            {"id": "c", "model": "gemma", "view": {"kind": "none"}, "message": {"policy": "relay"}},
        ],
        "corpus": {"source": "builtin:pydoc", "train_tokens": 48, "eval_tokens": ROUND * EVAL_ROUNDS},
        "bus": {"round_tokens": ROUND, "max_message_tokens": 4},
        "evaluation": {"context_tokens": 24, "warmup_rounds": 1, "top_k": 8},
    } | changes
    return write_tiny_scenario(folders["root"], folders["small"], name=name, **data)


def _prepare(folders: dict[str, Path], name: str, **changes):
    root = folders["root"]
    scenario = load_scenario(_scenario(folders, name, **changes))
    return prepare(scenario, ModelPool(cache_dir=root / "cache"), base_dir=root)


@pytest.fixture(scope="module")
def mixed(folders):
    return _prepare(folders, "mixed")


def test_a_mixed_collective_runs_in_bytes(mixed):
    assert mixed.unit == "byte"
    assert mixed.byte_mode is not None and not mixed.byte_mode.reads_stream("gemma")


def test_each_node_reads_the_views_bytes_in_its_own_tokens(mixed):
    engine = RoundEngine.from_prepared(mixed, EmbeddedExecutor.from_prepared(mixed), "t")
    mode = mixed.byte_mode
    for request, node in zip(engine.requests(2), mixed.scenario.nodes):
        seen = engine.observer.observe(node.id, engine.round_start(2))
        vocab = vocab_of(mixed.models[node.model].tokenizer)
        assert vocab.decode(request.prefix_ids.tolist()) == mode.text(seen.prefix_ids)
        assert vocab.decode(request.round_inputs.tolist()) == request.round_bytes == mode.text(seen.round_inputs)
        assert len(request.round_bytes) >= ROUND  # a round is R stream tokens, each >= 1 byte


def test_the_pools_of_byte_rows_are_exact_mixtures(mixed):
    """The silent ensemble (mean pool) is log(mean_i p_i(byte)) of the isolated rows at every
    byte: a byte row keeps all 256 values, so nothing is spread over a tail."""
    engine = RoundEngine.from_prepared(mixed, EmbeddedExecutor.from_prepared(mixed), "t")
    start = engine.round_start(1)
    targets, ones = engine._targets(start)
    results = engine.executor.run_round(1, engine.requests(1))
    pools = engine.pool(start, targets, results)
    members = torch.stack([results[n].isolated.target_logprob[0] for n in mixed.scenario.node_ids])  # (N, B)
    want = torch.logsumexp(members.double(), 0) - math.log(len(members))
    torch.testing.assert_close(pools.silent.target_logprob.double(), want, atol=1e-5, rtol=0)
    for node_id in mixed.scenario.node_ids:
        row = results[node_id].collective
        assert row.vocab_size == 256 and row.n_positions == len(targets) == int(ones.sum())
        torch.testing.assert_close(row.topk_logprobs[0].exp().sum(-1), torch.ones(len(targets)), atol=1e-5, rtol=0)


def test_a_mixed_run_books_bytes_and_its_messages_count_the_senders_tokens(mixed, folders):
    result = run_prepared(mixed, folders["root"] / "run-mixed")
    report = result.report
    assert report is not None
    mode = mixed.byte_mode
    starts = range(48, 48 + ROUND * EVAL_ROUNDS, ROUND)
    eval_bytes = sum(len(mode.text(mixed.stream[s : s + ROUND])) for s in starts)
    assert result.engine.unit == "byte" and result.engine.eval_bytes == eval_bytes
    for row in report.rows:
        assert row.n_tokens == eval_bytes, row.row  # every position is a byte
        assert row.bits_per_byte == pytest.approx(row.nll / math.log(2), rel=1e-6)
    lines = (folders["root"] / "run-mixed" / "events.jsonl").read_text(encoding="utf-8").splitlines()
    events = [e for e in map(parse_event, lines) if isinstance(e, RoundEvent)]
    assert report.unit == "byte" and {e.unit for e in events} == {"byte"}
    assert sum(e.n_bytes for e in events if e.phase == "eval") == eval_bytes
    sent = [m for e in events for m in e.messages if m.sender == "c" and not m.dropped]
    assert sent
    gemma, small = mixed.models["gemma"].tokenizer, mixed.models["small"].tokenizer
    for message in sent:  # c (gemma) relays its last 4 tokens: counted in gemma's tokens
        assert message.n_tokens == len(gemma.encode(message.text, add_special_tokens=False)) <= 4
    assert any(len(small.encode(m.text, add_special_tokens=False)) != m.n_tokens for m in sent)


def test_unit_token_with_two_tokenizers_is_refused_naming_the_field(folders):
    with pytest.raises(RunError, match=r"evaluation.unit: `token`"):
        _prepare(folders, "tok", evaluation={"context_tokens": 24, "warmup_rounds": 1, "unit": "token"})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"view": {"kind": "masked", "tokens": 16, "keep": 0.5}}, r"nodes\[1\] \(node 'b'\)\.view"),
        ({"message": {"policy": "search", "steps": 1}}, r"nodes\[1\] \(node 'b'\)\.message"),
        (
            {"controller": {"kind": "gcg", "objective": "collective", "steps": 1, "train_rounds": 1, "validation_rounds": 0}},
            r"nodes\[1\] \(node 'b'\)\.controller\.objective",
        ),
    ],
)
def test_what_bytes_cannot_score_is_refused_naming_the_node_field(folders, change, field):
    nodes = [
        {"id": "a", "model": "small"},
        {"id": "b", "model": "gemma"} | change,
    ]
    with pytest.raises(RunError, match=field):
        _prepare(folders, "refused", nodes=nodes)


def test_a_same_tokenizer_run_asked_for_bytes_scores_bytes(folders):
    nodes = [{"id": "a", "model": "small"}, {"id": "b", "model": "small", "view": {"kind": "none"}}]
    prepared = _prepare(folders, "same-bytes", nodes=nodes, evaluation={"context_tokens": 24, "warmup_rounds": 1, "unit": "byte"})
    assert prepared.unit == "byte" and prepared.byte_mode.reads_stream("small")
    plain = _prepare(folders, "same-tokens", nodes=nodes)
    assert plain.unit == "token" and plain.byte_mode is None


def test_a_local_gcg_search_in_a_mixed_run_scores_the_node_in_its_own_tokens(folders):
    gcg = {"kind": "gcg", "objective": "local", "steps": 2, "search_width": 8, "topk": 8, "tokens": 3, "train_rounds": 1,
           "validation_rounds": 0, "init": "x x x"}
    nodes = [{"id": "a", "model": "small"}, {"id": "b", "model": "gemma", "controller": gcg}]
    prepared = _prepare(folders, "gcg-local", nodes=nodes)
    (found,) = search_controls(prepared)
    gemma = prepared.models["gemma"].tokenizer
    assert found.node_id == "b" and found.objective == "local"
    assert prepared.control_ids["b"] == found.control_ids and max(found.control_ids) < len(gemma)
    assert found.control_text == gemma.decode(found.control_ids)
    # the initial prompt's loss is b's own NLL of the last train round, in gemma's tokens
    engine = RoundEngine.from_prepared(prepared, EmbeddedExecutor.from_prepared(prepared), "t")
    start = prepared.scenario.corpus.train_tokens - ROUND
    seen = engine.observer.observe("b", start)
    mode = prepared.byte_mode
    ids = [gemma.bos_token_id] + gemma.encode("x x x", add_special_tokens=False) + mode.ids("gemma", seen.prefix_ids).tolist()
    targets = mode.ids("gemma", seen.round_inputs).tolist()
    with torch.no_grad():
        logits = prepared.models["gemma"].model(input_ids=torch.tensor([ids + targets[:-1]])).logits[0, len(ids) - 1 :]
    nll = -torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(targets)[:, None]).mean()
    assert found.initial_loss == pytest.approx(float(nll), abs=1e-4)


def test_a_member_whose_token_bytes_cannot_be_read_is_named_by_its_models_field(folders, capsys):
    from collective.cli import main
    from tests.test_yardstick import _unreadable_tokenizer_model

    root = folders["root"]
    words = _unreadable_tokenizer_model(root / "words")
    models = {
        "small": {"ref": str(folders["small"]), "dtype": "float32", "device": "cpu"},
        "words": {"ref": str(words), "dtype": "float32", "device": "cpu"},
    }
    nodes = [{"id": "a", "model": "small"}, {"id": "b", "model": "words"}]
    with pytest.raises(RunError, match=r"^models\.words: a byte-unit run reads every model's tokens as bytes, but"):
        _prepare(folders, "words", models=models, nodes=nodes)
    path = root / "words.yaml"
    assert main(["--cache-dir", str(root / "cache"), "validate", "--deep", str(path)]) == 2
    err = capsys.readouterr()
    assert f"{path}: models.words:" in " ".join((err.out + err.err).split())
    assert not (root / "runs").exists()  # nothing written
