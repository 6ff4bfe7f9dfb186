"""Fields a scenario file may set that then do nothing: one warning line per such field.

`idle_fields(data, scenario, source)` reads the file's own YAML `data` (what the user
wrote, not the resolved scenario, whose dumps hold every default) and the validated
`scenario`, and returns one line per setting that cannot have an effect:

- a perplexity filter with a fixed `threshold` beside a fitting field (`false_drop_rate`,
  `fit_messages`): only a fitted threshold reads them;
- a gcg controller's `patience` with `validation_rounds: 0`: patience counts validation steps;
- `aggregator.exclude` under a `readout` of a node it does not exclude: the answer is that
  node's prediction alone, and no pool is formed;
- a `retokenize` filter before a charset filter that strips: stripping re-encodes the text,
  so the retokenized split is lost;
- a searched or attack message's `span_tokens` beyond all the node can read (its view's
  reach before the round plus the round): the span is cut to what it read.

`load_scenario` logs each line as a warning (the CLI prints warnings on stderr); nothing is
refused, since the same fields are legitimately present in dumps made by the library.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from collective.message_specs import AttackMessage, CharsetFilter, RetokenizeFilter, SearchMessage

if TYPE_CHECKING:
    from collective.scenario import Scenario

_FITTING = ("false_drop_rate", "fit_messages")


def idle_fields(data: dict[str, Any], scenario: Scenario, source: str) -> list[str]:
    """One line per field of `data` that does nothing in `scenario` (see the module docstring)."""
    lines = [f"{source}: {where}: {why}" for where, why in _idle_in_file(data)]
    lines += [f"{source}: {where}: {why}" for where, why in _idle_in_scenario(scenario)]
    return lines


def _node_sections(data: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(dotted path, mapping) of node_defaults and every node entry or template override."""
    if isinstance(data.get("node_defaults"), dict):
        yield "node_defaults", data["node_defaults"]
    nodes = data.get("nodes")
    if isinstance(nodes, list):
        yield from ((f"nodes.{i}", node) for i, node in enumerate(nodes) if isinstance(node, dict))
    elif isinstance(nodes, dict) and isinstance(nodes.get("overrides"), dict):
        yield from ((f"nodes.overrides.{k}", v) for k, v in nodes["overrides"].items() if isinstance(v, dict))


def _idle_in_file(data: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for where, section in _node_sections(data):
        controller = section.get("controller")
        if isinstance(controller, dict) and "patience" in controller and controller.get("validation_rounds") == 0:
            yield f"{where}.controller.patience", "does nothing with validation_rounds: 0 (patience counts validation steps)"
        for index, spec in enumerate(section.get("firewall") or []):
            if isinstance(spec, dict) and spec.get("kind") == "perplexity" and spec.get("threshold") is not None:
                given = [name for name in _FITTING if name in spec]
                if given:
                    yield (
                        f"{where}.firewall.{index}.{given[0]}",
                        "does nothing beside a fixed threshold (only a fitted threshold reads it); remove one of them",
                    )


def _idle_in_scenario(scenario: Scenario) -> Iterator[tuple[str, str]]:
    spec = scenario.aggregator
    if spec.kind == "readout" and spec.exclude and spec.node not in spec.exclude:
        yield "aggregator.exclude", f"does nothing: a readout's answer is node {spec.node!r}'s prediction alone"
    for node in scenario.nodes:
        span = node.message.span_tokens if isinstance(node.message, AttackMessage | SearchMessage) else None
        most = scenario.view_reach(node) + scenario.bus.round_tokens
        if span is not None and span > most:
            yield (
                f"node {node.id!r} message.span_tokens",
                f"{span} is more than the node ever reads (at most {most} tokens: its view's reach "
                f"{scenario.view_reach(node)} and the round's {scenario.bus.round_tokens}); the span is cut to what it read",
            )
        kinds = [
            "retokenize" if isinstance(f, RetokenizeFilter) else "strip" if isinstance(f, CharsetFilter) and f.action == "strip" else ""
            for f in node.firewall
        ]
        if "retokenize" in kinds and "strip" in kinds[kinds.index("retokenize") :]:
            yield (
                f"node {node.id!r} firewall",
                "a retokenize filter before a charset filter that strips is undone whenever the strip removes a "
                "character (the stripped text is encoded again); put retokenize after it",
            )
