"""The `replay` message policy's texts: what each replaying node sent, round by round, in a
finished run (its `events.jsonl`), read once at prepare time.

A replay is the priming control of a written message matched across runs: the plain run's
own text, reordered as a relay's shuffle is (`collective.run.node`), so the receivers read
the same tokens, as many, in another order. It means that only if the replayed run read the
same stream in the same rounds, so the recorded scenario's corpus, round length and warm-up
must be this one's; anything else is a `RunError` naming the node's `message.run`.
"""

from __future__ import annotations

from pathlib import Path

from collective.records import INCOMPLETE, RoundEvent, parse_event
from collective.scenario import ReplayMessage, Scenario, ScenarioError, load_scenario

# what must be equal for round r of the replayed run to be round r of this one
STREAM_FIELDS = ("corpus.source", "corpus.path", "corpus.offset_tokens", "corpus.train_tokens", "corpus.eval_tokens",
                 "bus.round_tokens", "evaluation.warmup_rounds")


class ReplayError(ValueError):
    """A replayed run that is missing, unfinished or of another stream."""


def _value(scenario: Scenario, dotted: str) -> object:
    value: object = scenario
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def read_replay(folder: Path, node_id: str, scenario: Scenario) -> dict[int, str | None]:
    """round index -> the text `node_id` sent in that round of the finished run in `folder`
    (None: it sent nothing), after checking that run read this scenario's stream."""
    events, recorded = folder / "events.jsonl", folder / "scenario.yaml"
    if not events.is_file() or not recorded.is_file():
        raise ReplayError(f"{folder} is not a run folder (no events.jsonl and scenario.yaml)")
    if (folder / INCOMPLETE).exists():
        raise ReplayError(f"{folder} is not a finished run ({INCOMPLETE} is there): replay a complete one")
    try:
        other = load_scenario(recorded)
    except ScenarioError as exc:
        raise ReplayError(f"{recorded} does not load: {exc}") from None
    differ = [f"{name}: {_value(other, name)!r} there, {_value(scenario, name)!r} here"
              for name in STREAM_FIELDS if _value(other, name) != _value(scenario, name)]
    if differ:
        raise ReplayError(f"{folder} read another stream ({'; '.join(differ)}): its rounds are not this run's")
    if node_id not in other.node_ids:
        raise ReplayError(f"{folder} has no node {node_id!r} (its nodes: {', '.join(other.node_ids)})")
    texts: dict[int, str | None] = {}
    for line in events.read_text(encoding="utf-8").splitlines():
        record = parse_event(line)
        if isinstance(record, RoundEvent):
            texts[record.round_index] = next((n.last_message for n in record.nodes if n.node_id == node_id), None)
    return texts


def replay_texts(scenario: Scenario, base_dir: Path) -> dict[str, dict[int, str | None]]:
    """node -> round -> replayed text, for every node whose message policy is `replay`;
    a relative `run` is read from `base_dir` (the scenario file's folder)."""
    out = {}
    for node in scenario.nodes:
        if isinstance(node.message, ReplayMessage):
            folder = Path(node.message.run).expanduser()
            folder = folder if folder.is_absolute() else base_dir / folder
            try:
                out[node.id] = read_replay(folder, node.id, scenario)
            except ReplayError as exc:
                raise ReplayError(f"nodes[{node.id}].message.run: {exc}") from None
    return out


__all__ = ["STREAM_FIELDS", "ReplayError", "read_replay", "replay_texts"]
