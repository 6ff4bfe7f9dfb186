"""Fields that are accepted but do nothing: `load_scenario` warns, naming the file and field
(issue 22 item 12); a scenario without them loads without a warning."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from collective.scenario import load_scenario


def _scenario(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "idle",
        "models": {"m": "some/model"},
        "corpus": {"train_tokens": 512, "eval_tokens": 64},
        "node_defaults": {"model": "m", "message": {"policy": "relay"}},
        "nodes": [{"id": "a"}, {"id": "b"}, {"id": "c"}],
        "topology": {"kind": "ring"},
        "bus": {"round_tokens": 16},
        "evaluation": {"context_tokens": 32, "warmup_rounds": 1},
    }
    data.update(changes)
    return data


def _warnings(tmp_path: Path, caplog, data: dict[str, Any]) -> list[str]:
    path = tmp_path / "idle.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="collective.scenario"):
        load_scenario(path)
    return [r.getMessage().replace(f"{path}: ", "") for r in caplog.records if r.levelno == logging.WARNING]


GCG = {"kind": "gcg", "objective": "local"}


@pytest.mark.parametrize(
    ("changes", "warning"),
    [
        ({"node_defaults": {"model": "m", "message": {"policy": "relay"},
                            "firewall": [{"kind": "perplexity", "threshold": 6.0, "false_drop_rate": 0.1}]}},
         "node_defaults.firewall.0.false_drop_rate: does nothing beside a fixed threshold"),
        ({"nodes": [{"id": "a", "controller": {**GCG, "patience": 5, "validation_rounds": 0}}, {"id": "b"}, {"id": "c"}]},
         "nodes.0.controller.patience: does nothing with validation_rounds: 0"),
        ({"aggregator": {"kind": "readout", "node": "a", "exclude": ["b"]}},
         "aggregator.exclude: does nothing: a readout's answer is node 'a''s prediction alone"),
        ({"node_defaults": {"model": "m", "message": {"policy": "relay"},
                            "firewall": [{"kind": "retokenize"}, {"kind": "charset", "action": "strip"}]}},
         "node 'a' firewall: a retokenize filter before a charset filter that strips is undone"),
        ({"nodes": [{"id": "a", "view": {"kind": "window", "tokens": 8}, "message": {"policy": "attack", "span_tokens": 64}},
                    {"id": "b"}, {"id": "c"}]},
         "node 'a' message.span_tokens: 64 is more than the node ever reads (at most 24 tokens"),
    ],
)
def test_a_field_that_does_nothing_is_a_warning_naming_it(tmp_path, caplog, changes, warning):
    found = _warnings(tmp_path, caplog, _scenario(**changes))
    assert any(line.startswith(warning) for line in found), found


def test_the_same_fields_where_they_act_give_no_warning(tmp_path, caplog):
    firewall = [{"kind": "charset", "action": "strip"}, {"kind": "retokenize"}, {"kind": "perplexity", "false_drop_rate": 0.1}]
    data = _scenario(
        node_defaults={"model": "m", "message": {"policy": "relay"}, "firewall": firewall},
        nodes=[{"id": "a", "controller": {**GCG, "patience": 5, "validation_rounds": 1}},
               {"id": "b", "view": {"kind": "window", "tokens": 8}, "message": {"policy": "attack", "span_tokens": 24}}, {"id": "c"}],
        aggregator={"kind": "mean", "exclude": ["b"]},
    )
    assert _warnings(tmp_path, caplog, data) == []
