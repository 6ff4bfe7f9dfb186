"""End to end on the real SmolLM2-135M: `collective run` writes a sound report, the plain
rows do not depend on the bus, and a silent collective gains nothing from communication."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from collective.cli import main
from collective.lm.models import ModelPool
from collective.records import Report, RoundEvent, RunEnd, RunStart, parse_event
from collective.run.runner import prepare, run_prepared
from collective.scenario import load_scenario

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
ROUND, EVAL_ROUNDS, WARMUP = 16, 4, 1
NODES = ["a", "b", "c", "d"]


def _scenario(name: str = "integration", **changes: Any) -> dict[str, Any]:
    corpus: dict[str, Any] = {"train_tokens": 96, "eval_tokens": ROUND * EVAL_ROUNDS, "offset_tokens": 200}
    corpus.update({"source": "file", "path": str(WIKITEXT)} if WIKITEXT.exists() else {"source": "builtin:pydoc"})
    data: dict[str, Any] = {
        "name": name,
        "seed": 1,
        "corpus": corpus,
        "models": {"smol": "smollm2-135m"},
        "node_defaults": {"model": "smol", "message": {"policy": "generate", "speak_prompt": "\nIn short:"}},
        "nodes": [
            {"id": "a", "view": {"kind": "window", "tokens": 32}},
            {"id": "b", "view": {"kind": "lagged", "tokens": 32, "lag": 16}},
            {"id": "c", "view": {"kind": "masked", "tokens": 32, "keep": 0.6}},
            {"id": "d", "view": {"kind": "lagged", "tokens": 32, "lag": 16}},
        ],
        "topology": {"kind": "ring"},
        "bus": {"round_tokens": ROUND, "max_message_tokens": 8, "max_message_bytes": 60},
        "evaluation": {"context_tokens": 64, "warmup_rounds": WARMUP},
    }
    data.update(changes)
    return data


def _write(folder: Path, data: dict[str, Any]) -> Path:
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> tuple[Path, Report]:
    folder = tmp_path_factory.mktemp("integration")
    out = folder / "run"
    code = main(["run", str(_write(folder, _scenario())), "--no-live", "--out", str(out)])
    assert code == 0
    return out, Report.model_validate_json((out / "report.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def pool() -> ModelPool:
    return ModelPool()


def _run(pool: ModelPool, folder: Path, data: dict[str, Any]) -> Report:
    scenario = load_scenario(_write(folder, data))
    result = run_prepared(prepare(scenario, pool, base_dir=folder), folder / f"run-{data['name']}")
    assert result.report is not None
    return result.report


def test_collective_run_writes_a_complete_run_folder(cli_run):
    out, report = cli_run
    assert {"scenario.yaml", "events.jsonl", "report.json", "report.md"} <= {p.name for p in out.iterdir()}
    assert not (out / "INCOMPLETE").exists()
    events = [parse_event(line) for line in (out / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    assert isinstance(events[0], RunStart) and isinstance(events[-1], RunEnd) and events[-1].status == "complete"
    rounds = [e for e in events if isinstance(e, RoundEvent)]
    assert len(rounds) == WARMUP + EVAL_ROUNDS
    messages = [m for e in rounds for m in e.messages]
    assert len(messages) == len(rounds) * len(NODES) * 2
    assert all(m.n_tokens <= 8 and m.n_bytes <= 60 for m in messages)
    assert any(m.text.strip() for m in messages)  # the model did write something
    assert all(n.inbox_tokens > 0 for e in rounds[1:] for n in e.nodes)


def test_the_report_has_every_row_with_consistent_numbers(cli_run):
    _, report = cli_run
    assert (report.n_eval_rounds, report.n_eval_tokens) == (EVAL_ROUNDS, ROUND * EVAL_ROUNDS)
    expected = [(k, n) for k in ("member_plain", "member_isolated", "member_collective") for n in NODES]
    expected += [("ensemble_silent", None), ("collective", None), ("reference", None)]
    assert [(r.row, r.node_id) for r in report.rows] == expected
    for row in report.rows:
        assert 0.0 < row.nll < 20.0
        assert row.n_tokens == report.n_eval_tokens
        assert row.perplexity == pytest.approx(math.exp(row.nll), rel=1e-9)
        assert row.bits_per_byte == pytest.approx(row.nll * row.n_tokens / math.log(2) / report.eval_bytes, rel=1e-9)
        assert row.nll_ci.low <= row.nll <= row.nll_ci.high
        assert 0.0 <= row.top1 <= 1.0
    for node_id in NODES:  # no control prompts: isolated is plain
        assert report.row("member_isolated", node_id).nll == report.row("member_plain", node_id).nll
    best = min((r for r in report.rows if r.row == "member_isolated"), key=lambda r: r.nll)
    assert report.best_member == best.node_id
    assert report.collective_gain.value == pytest.approx(best.nll - report.row("collective").nll, abs=1e-9)
    assert report.communication_gain.value == pytest.approx(
        report.row("ensemble_silent").nll - report.row("collective").nll, abs=1e-9
    )
    # a real model reads text: the full-view reference beats a 32-token window
    assert report.row("reference").nll < report.row("member_plain", "a").nll


def test_plain_member_rows_do_not_depend_on_the_bus(cli_run, pool, tmp_path):
    _, report = cli_run
    other = _run(pool, tmp_path, _scenario(
        name="other-bus",
        bus={"round_tokens": ROUND, "max_message_tokens": 4, "max_message_bytes": 30, "latency_rounds": 2,
             "drop_rate": 0.5, "retain": 2},
    ))
    for kind in ("member_plain", "member_isolated", "ensemble_silent", "reference"):
        assert [r.model_dump() for r in other.rows if r.row == kind] == [r.model_dump() for r in report.rows if r.row == kind]
    assert other.row("collective").nll != report.row("collective").nll


def test_a_silent_collective_has_a_communication_gain_ci_covering_zero(pool, tmp_path):
    report = _run(pool, tmp_path, _scenario(
        name="silent", node_defaults={"model": "smol", "message": {"policy": "silent"}}
    ))
    gain = report.communication_gain
    assert gain.value == 0.0
    assert gain.ci.low <= 0.0 <= gain.ci.high
    assert report.messages_sent == 0
    assert "communication made no measurable difference" in report.verdict


def test_a_two_cell_sweep_of_relayed_and_searched_messages(tmp_path):
    """`collective sweep` on the real model: a relay cell and a searched-message cell, each a
    finished run folder, and a summary whose searched messages stayed within the budget."""
    import json

    # the search settings sit in the file; the relay cell replaces the whole message mapping
    search = {"policy": "search", "steps": 1, "search_width": 8, "topk": 8}
    scenario = _write(tmp_path, _scenario(name="sweep", node_defaults={"model": "smol", "message": search}))
    out = tmp_path / "sweep"
    code = main(["sweep", str(scenario), "--set", "node_defaults.message.policy=relay,search", "--out", str(out), "--threads", "1"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [c["overrides"]["node_defaults.message.policy"] for c in summary["cells"]] == ["relay", "search"]
    assert (out / "gain_vs_bandwidth.png").stat().st_size > 0
    searched = next(p for p in out.iterdir() if "search" in p.name and p.is_dir())
    events = [parse_event(line) for line in (searched / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    rounds = [e for e in events if isinstance(e, RoundEvent)]
    found = [n.message_search for e in rounds for n in e.nodes]
    assert found and all(s is not None and s.after <= s.before for s in found)
    assert all(m.n_tokens <= 8 and m.n_bytes <= 60 for e in rounds for m in e.messages)
