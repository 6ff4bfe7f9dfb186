"""`collective reach`'s pieces: the --corpus option as a scenario corpus, and summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collective.cli.controllers import ReachSummaryRecord, corpus_spec
from controllers.reach import ReachRow, summarize


def row(pair: int, k: int, reached: bool) -> ReachRow:
    return ReachRow(pair, "true", "x", "1", 2, "y", 3, 1.0, "gcg", k, reached, 0.5, "", "", 1.0)


@pytest.mark.parametrize("source", ["builtin:pydoc", "wikitext2", "hf:wikitext:wikitext-2-raw-v1:test"])
def test_a_corpus_source_the_scenario_knows_stays_a_source(source):
    spec = corpus_spec(source, None)
    assert (spec.source, spec.path) == (source, None)


def test_corpus_path_goes_with_a_known_source():
    assert corpus_spec("wikitext2", "data/wiki.test.raw").path == Path("data/wiki.test.raw")


@pytest.mark.parametrize("corpus", ["notes.txt", "/tmp/some text.md", "file"])
def test_anything_else_is_a_text_file(corpus):
    spec = corpus_spec(corpus, None)
    assert (spec.source, spec.path) == ("file", Path(corpus))


def test_summary_json_is_version_2_with_the_pairs_out_of_budget_per_k():
    cut = ReachRow(3, "true", "x", "1", 2, "y", 3, 1.0, "base", 0, False, 0.5, "", "", 1.0, out_of_budget_k=1)
    summary = summarize([row(0, 0, True), row(1, 2, True), row(2, 0, False), cut], (0, 1, 2), "true")
    record = ReachSummaryRecord.of(summary, "tiny", "collective reach --model tiny")
    expected = {  # version 1's keys in their order, then out_of_budget before the command
        "schema_version": 2,
        "model": "tiny",
        "targets": summary.targets,
        "n_pairs": summary.n_pairs,
        "fraction": {str(k): v for k, v in summary.fraction.items()},
        "out_of_budget": {"0": 0, "1": 1, "2": 1},
        "command": "collective reach --model tiny",
    }
    assert record.to_json() == json.dumps(expected, indent=2) + "\n"
    assert ReachSummaryRecord.model_validate_json(record.to_json()) == record
    assert record.fraction == {"0": pytest.approx(1 / 4), "1": pytest.approx(1 / 4), "2": pytest.approx(2 / 4)}
