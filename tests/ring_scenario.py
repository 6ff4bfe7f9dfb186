"""A small scenario for the distributed runtime's unit tests: nodes a, b, c on a directed ring
(a -> b -> c -> a), relay messages, a model that is never loaded. Only parsed, never run."""

from __future__ import annotations

from typing import Any

from collective.scenario import Scenario, parse_scenario

RING_EDGES = [("a", "b"), ("b", "c"), ("c", "a")]


def ring_scenario(**evaluation: Any) -> Scenario:
    return parse_scenario(
        {
            "name": "ring",
            "models": {"m": "x"},
            "corpus": {"train_tokens": 512, "eval_tokens": 64},
            "node_defaults": {"model": "m", "view": {"kind": "window", "tokens": 16}, "message": {"policy": "relay"}},
            "nodes": [{"id": "a"}, {"id": "b"}, {"id": "c"}],
            "topology": {"kind": "ring", "directed": True},
            "bus": {"round_tokens": 4, "max_message_tokens": 8, "max_message_bytes": 64},
            "evaluation": {"context_tokens": 64, **evaluation},
        }
    )
