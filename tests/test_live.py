"""The live view: the state fold and the pure views, rendered to a string at 100 columns."""

from __future__ import annotations

import io
import math
import random
from dataclasses import replace

import networkx as nx
import pytest
from rich.console import Console

from collective.live import (
    LiveState,
    collective_view,
    dashboard,
    header_view,
    node_table,
    sparkline,
    topology_view,
)
from collective.live.display import LiveDisplay, watch
from collective.live.topology import HOSTILE, topology_grid
from collective.records import (
    MessageRecord,
    NodeInfo,
    NodeRound,
    RoundEvent,
    RunEnd,
    RunRecord,
    RunStart,
    ScreenRecord,
)


def synthetic_run(
    n_nodes: int = 3, rounds: int = 6, warmup: int = 2, seed: int = 0, drop_rate: float = 0.1
) -> list[RunRecord]:
    """A made-up but well-formed event stream: a ring (n <= 4) or a small world, messages on
    about half the links each round, NLLs around 3 nats."""
    rng = random.Random(seed)
    ids = [chr(ord("a") + i) for i in range(n_nodes)] if n_nodes <= 26 else [f"n{i}" for i in range(n_nodes)]
    graph = nx.cycle_graph(n_nodes) if n_nodes <= 4 else nx.watts_strogatz_graph(n_nodes, 4, 0.2, seed=seed)
    edges = [(ids[a], ids[b]) for a, b in graph.edges()] + [(ids[b], ids[a]) for a, b in graph.edges()]
    start = RunStart(
        run_id="run-1",
        scenario="synthetic",
        seed=seed,
        nodes=[
            NodeInfo(node_id=i, model="smol", view="window 48", message_policy="generate", controller="none")
            for i in ids
        ],
        edges=edges,
        directed=False,
        warmup_rounds=warmup,
        eval_rounds=rounds - warmup,
        round_tokens=32,
        max_message_tokens=24,
        max_message_bytes=160,
        aggregator="mean",
    )
    events: list[RunRecord] = [start]
    for r in range(rounds):
        messages = [
            MessageRecord(
                sender=a, receiver=b, round_sent=r, deliver_round=r + 1, text=f"{a} says {r}",
                n_tokens=4, n_bytes=40, dropped=rng.random() < drop_rate,
            )
            for a, b in edges
            if rng.random() < 0.5
        ]
        nodes = [
            NodeRound(
                node_id=i,
                nll_collective=3.0 + rng.random(),
                nll_isolated=3.2 + rng.random(),
                nll_plain=3.3,
                bytes_sent=sum(m.n_bytes for m in messages if m.sender == i and not m.dropped),
                messages_sent=sum(m.sender == i for m in messages),
                messages_dropped=sum(m.sender == i and m.dropped for m in messages),
                last_message=f"node {i} saw\tround {r}\n",
            )
            for i in ids
        ]
        events.append(
            RoundEvent(
                run_id="run-1", round_index=r, phase="warmup" if r < warmup else "eval",
                eval_round=None if r < warmup else r - warmup, start_token=32 * r, n_tokens=32,
                nodes=nodes, messages=messages, nll_collective=2.9 + rng.random(),
                nll_silent=3.0 + rng.random(), nll_reference=2.5 + rng.random(),
                wall_seconds=2.0, elapsed_seconds=2.0 * (r + 1),
            )
        )
    events.append(RunEnd(run_id="run-1", status="complete", rounds_done=rounds))
    return events


def render(renderable: object, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    return out


def widest_line(text: str) -> int:
    return max(len(line.rstrip()) for line in text.splitlines())


# ---------------------------------------------------------------------------- the state fold


def test_apply_returns_a_new_state_and_leaves_the_old_one_untouched():
    events = synthetic_run()
    started = LiveState.empty().apply(events[0])
    after = started.apply(events[1])
    assert started.rounds_done == 0 and after.rounds_done == 1
    assert started.nodes[0].last_nll is None and after.nodes[0].last_nll is not None


def test_running_means_cover_eval_rounds_only_once_eval_begins():
    events = synthetic_run(rounds=6, warmup=2)
    state = LiveState.fold(events[:-1])
    rounds = [e for e in events if isinstance(e, RoundEvent)]
    eval_rounds = [e for e in rounds if e.phase == "eval"]
    assert state.collective.mean == pytest.approx(sum(e.nll_collective for e in eval_rounds) / len(eval_rounds))
    first = state.nodes[0]
    expected = [next(n.nll_isolated for n in e.nodes if n.node_id == first.node_id) for e in eval_rounds]
    assert first.nll_isolated.mean == pytest.approx(sum(expected) / len(expected))
    assert len(state.history_collective) == len(rounds)  # sparklines keep the warm-up


def test_running_means_cover_warmup_rounds_while_warming_up():
    events = synthetic_run(rounds=6, warmup=3)
    state = LiveState.fold(events[:3])  # start + two warm-up rounds
    assert state.phase == "warmup"
    assert state.collective.count == 2


def test_gains_are_positive_when_the_collective_is_ahead():
    events = synthetic_run()
    state = LiveState.fold(events)
    best = state.best_member()
    assert best is not None and best.nll_isolated.mean is not None and state.collective.mean is not None
    assert state.collective_gain == pytest.approx(best.nll_isolated.mean - state.collective.mean)
    assert best.nll_isolated.mean == min(n.nll_isolated.mean for n in state.nodes if n.nll_isolated.mean)


def test_links_that_carried_a_message_this_round_are_active_and_dropped_ones_are_not():
    events = synthetic_run(drop_rate=0.3)
    last_round = events[-2]
    assert isinstance(last_round, RoundEvent)
    state = LiveState.fold(events[:-1])
    delivered = {(m.sender, m.receiver) for m in last_round.messages if not m.dropped}
    dropped = {(m.sender, m.receiver) for m in last_round.messages if m.dropped}
    assert state.active_links == delivered and state.dropped_links == dropped


def test_a_missed_round_is_counted_and_does_not_enter_the_means():
    events = synthetic_run(rounds=3, warmup=0)
    third = events[3]
    assert isinstance(third, RoundEvent)
    nodes = list(third.nodes)
    nodes[0] = NodeRound(node_id=nodes[0].node_id, nll_collective=None, nll_isolated=None, nll_plain=None, missed=True)
    events[3] = third.model_copy(update={"nodes": nodes})
    state = LiveState.fold(events[:4])
    assert state.nodes[0].rounds_missed == 1 and state.nodes[0].status == "missed"
    assert state.nodes[0].nll_collective.count == 2


def test_eta_and_tokens_per_second_follow_the_elapsed_time():
    events = synthetic_run(rounds=6, warmup=2)
    state = LiveState.fold(events[:3])  # two rounds of 2 s each
    assert state.eta_seconds == pytest.approx(4 * 2.0)
    assert state.tokens_per_second == pytest.approx(64 / 4.0)
    assert LiveState.fold(events).eta_seconds is None


def test_a_view_that_attaches_mid_run_counts_the_rounds_it_never_saw():
    events = synthetic_run(rounds=6, warmup=2)
    start, rounds, end = events[0], events[1:-1], events[-1]
    state = LiveState.fold([start, rounds[3]])  # a watcher that came in during round 4 (0-based 3)
    assert state.rounds_done == 4 and state.phase == "eval" and state.eval_rounds_done == 2
    assert state.tokens_per_second == pytest.approx(4 * 32 / 8.0) and state.eta_seconds == pytest.approx(2 * 2.0)
    assert state.collective.count == 1 and all(node.nll_collective.count == 1 for node in state.nodes)
    assert "round 4/6" in render(header_view(state))
    state = LiveState.fold([start, *rounds[3:], end])
    assert state.rounds_done == 6 and state.finished and state.collective.count == 3
    full = LiveState.fold(events)
    assert (full.rounds_done, full.tokens_done) == (state.rounds_done, state.tokens_done)


def test_watch_of_a_stream_that_begins_mid_run_prints_the_real_round_numbers():
    events = synthetic_run(rounds=6, warmup=2)
    console = Console(file=io.StringIO(), width=200, color_system=None)
    state = watch([events[0], *events[4:]], console, live=False)
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert [line.split()[1] for line in lines[:3]] == ["4/6", "5/6", "6/6"] and state.rounds_done == 6


# ---------------------------------------------------------------------------- the views


def test_sparkline_maps_low_to_the_lowest_block_and_high_to_the_highest():
    line = sparkline([1.0, 2.0, 3.0], 3)
    assert line[0] == "▁" and line[2] == "█" and line[1] in "▄▅"
    assert sparkline([1.0, math.nan, 3.0], 3) == "▁ █"
    assert sparkline(list(range(50)), 10) == sparkline(list(range(40, 50)), 10)


def test_the_header_shows_the_round_counter_eta_and_tokens_per_second():
    state = LiveState.fold(synthetic_run(rounds=6, warmup=2)[:4])
    text = render(header_view(state))
    assert "round 3/6" in text and "eval 1/4" in text and "ETA 0:06" in text and "tok/s" in text


def test_the_topology_draws_every_node_and_the_links_between_them():
    state = LiveState.fold(synthetic_run(n_nodes=3)[:-1])
    text = render(topology_view(state, 56, 12))
    for node_id in "abc":
        assert node_id in text
    assert "━" in text or "┃" in text  # links that carried a message this round are heavy
    assert "3 nodes, 3 links" in text


def test_an_idle_topology_draws_light_links_only():
    events = synthetic_run(n_nodes=4)
    start = events[0]
    assert isinstance(start, RunStart)
    grid = topology_grid(LiveState.started(start), 40, 10)
    chars = {cell.char for row in grid for cell in row}
    assert chars & {"─", "│", "╱", "╲"} and not chars & {"━", "┃"}


def test_labels_of_a_32_node_topology_never_overlap():
    state = LiveState.fold(synthetic_run(n_nodes=32)[:-1])
    text = render(topology_view(state, 55, 17))
    for i in range(32):
        assert f"n{i}" in text.replace("─", " ").replace("━", " "), f"n{i} missing"


def test_the_collective_panel_shows_the_collective_best_member_and_silent_ensemble():
    state = LiveState.fold(synthetic_run()[:-1])
    text = render(collective_view(state, 44), width=44)
    assert f"collective {state.collective.mean:.3f}" in " ".join(text.split())
    best = state.best_member()
    assert best is not None and f"best member {best.node_id}" in text
    assert "silent ensemble" in text and "gain vs best" in text and "gain vs silent" in text


def test_the_node_table_shows_each_node_with_its_numbers_and_last_message():
    state = LiveState.fold(synthetic_run()[:-1])
    text = render(node_table(state))
    for node in state.nodes:
        assert node.nll_collective.mean is not None
        line = next(line for line in text.splitlines() if line.startswith(node.node_id + " "))
        assert f"{node.nll_collective.mean:.3f}" in line and "window 48" in line
        assert "saw→round" in line  # tabs and newlines shown as symbols, on one line


def test_the_node_table_says_how_many_nodes_it_left_out():
    state = LiveState.fold(synthetic_run(n_nodes=32)[:-1])
    text = render(node_table(state, max_rows=10))
    assert "n9 " in text and "n10 " not in text and "22 more nodes" in text


@pytest.mark.parametrize("n_nodes", [3, 32])
def test_the_dashboard_fits_in_100_columns_and_40_lines(n_nodes):
    state = LiveState.fold(synthetic_run(n_nodes=n_nodes)[:-1])
    text = render(dashboard(state, 100, 40))
    assert widest_line(text) <= 100
    assert len(text.splitlines()) <= 40
    assert "round 6/6" in text and "collective" in text
    assert "n0" in text if n_nodes == 32 else "a" in text


def test_the_dashboard_stacks_its_panels_on_a_narrow_terminal():
    state = LiveState.fold(synthetic_run(n_nodes=3)[:-1])
    text = render(dashboard(state, 70, 60), width=70)
    assert widest_line(text) <= 70 and "topology" in text and "silent ensemble" in text


def test_the_dashboard_before_any_event_says_it_is_waiting():
    assert "waiting" in render(dashboard(LiveState.empty()))


# ---------------------------------------------------------------------------- the Live loop


def test_live_display_folds_every_event_and_prints_a_summary_on_exit():
    events = synthetic_run()
    start = events[0]
    assert isinstance(start, RunStart)
    console = Console(file=io.StringIO(), width=100, color_system=None, force_terminal=True)
    with LiveDisplay(start, console, screen=False) as display:
        for event in events[1:]:
            display.update(event)
    assert display.state.rounds_done == 6 and display.state.finished and display.updates == 7
    assert display.render_seconds > 0
    assert "round 6/6" in console.file.getvalue()  # type: ignore[attr-defined]


def test_watch_without_a_terminal_prints_one_plain_line_per_round():
    console = Console(file=io.StringIO(), width=100, color_system=None)
    state = watch(synthetic_run(), console)
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert state.finished and lines[0].startswith("round 1/6 warmup collective=") and lines[-1] == "end complete rounds=6"


def test_watch_paces_a_replay_by_the_recorded_round_times():
    slept: list[float] = []
    now = [0.0]
    watch(synthetic_run(rounds=3), Console(file=io.StringIO()), speed=4.0, sleep=slept.append, clock=lambda: now[0])
    assert slept == [0.5, 0.5, 0.5]  # 2 s rounds at 4x


def test_the_best_member_is_chosen_among_the_members_that_missed_no_round():
    state = LiveState.fold(synthetic_run()[:-1])
    best = state.best_member()
    assert best is not None
    missed = replace(best, rounds_missed=2)
    others = [node for node in state.nodes if node.node_id != best.node_id]
    partial = replace(state, nodes=(missed, *others))
    chosen = partial.best_member()
    assert chosen is not None and chosen.node_id != best.node_id  # the lower NLL missed rounds
    assert chosen.node_id == min(others, key=lambda node: node.nll_isolated.mean or 0.0).node_id
    every_one_missed = replace(state, nodes=tuple(replace(node, rounds_missed=1) for node in state.nodes))
    assert every_one_missed.best_member() == replace(best, rounds_missed=1)


def _with_an_attacker(events: list[RunRecord]) -> list[RunRecord]:
    """Node a is an attacker; in the last round a's message reaches c, and b's firewall drops
    the one a sent it the round before (the only messages of that round)."""
    start, *rounds = events
    assert isinstance(start, RunStart)
    nodes = [info if info.node_id != "a" else info.model_copy(update={"message_policy": "attack"}) for info in start.nodes]
    marked: list[RunRecord] = [start.model_copy(update={"nodes": nodes})]
    for index, event in enumerate(rounds):
        if isinstance(event, RoundEvent) and index == len(rounds) - 2:
            a_to_c = MessageRecord(sender="a", receiver="c", round_sent=event.round_index, deliver_round=event.round_index + 1,
                                   text="zq#x", n_tokens=3, n_bytes=4)
            screened = [ScreenRecord(sender="a", receiver="b", round_sent=event.round_index - 1, action="drop",
                                     filter="perplexity", score=9.1, threshold=6.0)]
            nodes_ = [n.model_copy(update={"messages_screened_out": 1}) if n.node_id == "b" else n for n in event.nodes]
            event = event.model_copy(update={"messages": [a_to_c], "screened": screened, "nodes": nodes_})
        marked.append(event)
    return marked


def test_an_attacker_and_its_messages_are_marked_and_firewall_drops_are_shown():
    events = _with_an_attacker(synthetic_run(n_nodes=3))
    state = LiveState.fold(events[:-1])
    assert state.screened_links == {("a", "b")}
    by_id = {node.node_id: node for node in state.nodes}
    assert by_id["a"].hostile and by_id["a"].status == "hostile" and not by_id["b"].hostile
    assert by_id["b"].screened_out == 1 and by_id["c"].screened_out == 0
    grid = topology_grid(state, 40, 10)
    cells = [cell for row in grid for cell in row]
    text = "".join(cell.char for cell in cells)
    assert "a!" in text and "b!" not in text  # the attacker's label carries the mark
    assert "×" in text  # the link whose message b's firewall dropped
    styles = {cell.style for cell in cells if cell.char in "━┃╱╲"}
    assert HOSTILE in styles  # a's delivered message to c is drawn as an attack
    table = render(node_table(state))
    line_a = next(line for line in table.splitlines() if line.startswith("a "))
    line_b = next(line for line in table.splitlines() if line.startswith("b "))
    assert "hostile" in line_a and "hostile" not in line_b
    assert " fw " in table.splitlines()[0] + " "
    legend = render(topology_view(state, 80, 12))
    assert "attack (!)" in legend and "firewall drop" in legend


# ---------------------------------------------------------------------------- byte-unit runs (events 5)


def byte_run(**kwargs) -> list[RunRecord]:  # type: ignore[no-untyped-def]
    """The synthetic run as a collective of several tokenizers writes it: every round's NLLs per byte."""
    return [e.model_copy(update={"unit": "byte"}) if isinstance(e, RoundEvent) else e for e in synthetic_run(**kwargs)]


def test_a_byte_round_event_round_trips_and_an_events_4_line_reads_as_token():
    from collective.records import EVENT_SCHEMA_VERSION, parse_event

    event = byte_run()[1]
    assert isinstance(event, RoundEvent) and event.unit == "byte" and event.schema_version == EVENT_SCHEMA_VERSION == 5
    assert parse_event(event.model_dump_json()) == event
    old = event.model_dump(mode="json")
    del old["unit"]
    old["schema_version"] = 4  # what events 4 wrote: no unit
    parsed = parse_event(__import__("json").dumps(old))
    assert isinstance(parsed, RoundEvent) and parsed.unit == "token" and parsed.schema_version == 4


def test_the_live_view_labels_a_byte_run_per_byte_and_a_token_run_as_before():
    byte, token = LiveState.fold(byte_run()[:-1]), LiveState.fold(synthetic_run()[:-1])
    assert byte.unit == "byte" and token.unit == "token"
    assert header_view(byte).plain.splitlines()[0].endswith("pool mean  NLL in nats/byte")
    assert header_view(token).plain.splitlines()[0].endswith("pool mean")
    assert "NLL/byte " in render(topology_view(byte, 60, 16), width=60)
    assert "NLL/byte" not in render(topology_view(token, 60, 16), width=60)
    text = render(dashboard(byte, 100, 40))
    assert widest_line(text) <= 100 and len(text.splitlines()) <= 40 and "nats/byte" in text


def test_watch_of_a_byte_run_ends_each_plain_line_with_its_unit():
    console = Console(file=io.StringIO(), width=100, color_system=None)
    watch(byte_run(), console)
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert all(line.endswith(" unit=byte") for line in lines if line.startswith("round "))
    console = Console(file=io.StringIO(), width=100, color_system=None)
    watch(synthetic_run(), console)
    assert "unit=" not in console.file.getvalue()  # type: ignore[attr-defined]
