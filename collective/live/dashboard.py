"""The live dashboard: header, topology, the collective's numbers, and the node table.

Every function here is pure: a `LiveState` (and the size to fill) in, a rich renderable
out. `dashboard(state, width, height)` lays the parts out:

    header       scenario, run, round k/N, eval progress, elapsed, ETA, tokens/s
    topology | collective   (side by side from 90 columns, stacked below that)
    node table   one row per node, cut to the height left (the rest counted in a caption)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from collective.live.state import LiveState, NodeState
from collective.live.topology import topology_view
from collective.records import RoundEvent

SPARK_CHARS = "▁▂▃▄▅▆▇█"
SIDE_BY_SIDE_MIN_WIDTH = 90
GOOD = "green"
BAD = "red"


# ---------------------------------------------------------------------------- small pieces


def sparkline(values: Sequence[float], width: int, low: float | None = None, high: float | None = None) -> str:
    """The last `width` values as block characters (NaN as a space), on a [low, high] scale."""
    shown = list(values)[-width:] if width > 0 else []
    finite = [v for v in shown if math.isfinite(v)]
    if not finite:
        return " " * len(shown)
    low = min(finite) if low is None else low
    high = max(finite) if high is None else high
    span = high - low
    chars = []
    for value in shown:
        if not math.isfinite(value):
            chars.append(" ")
            continue
        t = 0.5 if span < 1e-12 else (value - low) / span
        chars.append(SPARK_CHARS[min(len(SPARK_CHARS) - 1, max(0, int(t * len(SPARK_CHARS))))])
    return "".join(chars)


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _nll(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _signed(value: float | None) -> Text:
    if value is None or not math.isfinite(value):
        return Text("-")
    return Text(f"{value:+.3f}", style=GOOD if value > 0 else BAD if value < 0 else "")


def _bytes(n_bytes: int) -> str:
    if n_bytes < 1000:
        return f"{n_bytes}B"
    if n_bytes < 1_000_000:
        return f"{n_bytes / 1000:.1f}kB"
    return f"{n_bytes / 1_000_000:.1f}MB"


def _printable(text: str) -> str:
    """A message on one line: newlines and tabs shown as symbols, other control bytes as '·'."""
    out = []
    for char in text:
        if char == "\n":
            out.append("↵")
        elif char == "\t":
            out.append("→")
        elif ord(char) < 32 or 0x7F <= ord(char) < 0xA0:
            out.append("·")
        else:
            out.append(char)
    return "".join(out)


def round_line(event: RoundEvent, total_rounds: int) -> str:
    """One plain, parseable line per round (for pipes and logs): `key=value` after the counter;
    a byte-unit round (several tokenizers: NLLs per byte) ends with `unit=byte`."""
    return (
        f"round {event.round_index + 1}/{total_rounds} {event.phase} collective={event.nll_collective:.4f} "
        f"silent={event.nll_silent:.4f} reference={event.nll_reference:.4f} wall={event.wall_seconds:.2f}s"
    ) + (" unit=byte" if event.unit == "byte" else "")


# ---------------------------------------------------------------------------- header


def header_view(state: LiveState) -> Text:
    """Two lines: what runs (and, for a run of several tokenizers, that its NLLs are per byte),
    and how far it is."""
    if state.start is None:
        return Text("waiting for the run to start …", style="bold")
    start = state.start
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append("collective ", style="bold")
    text.append(start.scenario, style="bold cyan")
    text.append(f"  run {start.run_id}  seed {start.seed}  {start.runtime}  pool {start.aggregator}")
    if state.unit == "byte":  # several tokenizers: every NLL below is per byte of the text
        text.append("  NLL in nats/byte", style="bold")
    text.append("\n")
    total = state.total_rounds or 0
    text.append(f"round {state.rounds_done}/{total} ", style="bold")
    text.append_text(_bar(state.rounds_done, total, 20))
    if state.phase == "warmup" or (state.phase == "waiting" and start.warmup_rounds):
        text.append(f"  warm-up {min(state.rounds_done, start.warmup_rounds)}/{start.warmup_rounds}")
    else:
        text.append(f"  eval {state.eval_rounds_done}/{start.eval_rounds}")
    text.append(f"  elapsed {_duration(state.elapsed_seconds)}  ETA {_duration(state.eta_seconds)}")
    rate = state.tokens_per_second
    if rate is None:
        text.append("  - tok/s")
    else:
        text.append(f"  {rate:.0f} tok/s" if rate >= 10 else f"  {rate:.2g} tok/s")
    if state.end is not None:
        style = "bold green" if state.end.status == "complete" else "bold red"
        text.append(f"  {state.end.status}", style=style)
    elif state.rounds_done == 0:
        text.append("  starting …", style="yellow")
    return text


def _bar(done: int, total: int, width: int) -> Text:
    filled = 0 if total <= 0 else round(width * min(done, total) / total)
    return Text.assemble(("━" * filled, "green"), ("─" * (width - filled), "grey50"))


# ---------------------------------------------------------------------------- collective


def collective_view(state: LiveState, width: int) -> Table:
    """The collective's NLL so far against its best member, the silent ensemble and the
    full-view reference, with a sparkline of each per round on one shared scale."""
    best = state.best_member()
    spark_width = max(4, width - 18 - 6 - 2)
    series: list[tuple[str, float | None, tuple[float, ...], str]] = [
        ("collective", state.collective.mean, state.history_collective, "bold"),
        ("silent ensemble", state.silent.mean, state.history_silent, ""),
        (
            f"best member {best.node_id}" if best else "best member",
            best.nll_isolated.mean if best else None,
            best.history_isolated if best else (),
            "",
        ),
        ("reference", state.reference.mean, state.history_reference, "dim"),
    ]
    shown = [v for _, _, history, _ in series for v in history[-spark_width:] if math.isfinite(v)]
    low, high = (min(shown), max(shown)) if shown else (0.0, 0.0)
    scope = "eval" if state.phase == "eval" else "warm-up" if state.phase == "warmup" else ""
    table = Table.grid(padding=(0, 1))
    table.add_column(width=18, no_wrap=True, overflow="ellipsis")
    table.add_column(width=6, justify="right", no_wrap=True)
    table.add_column(no_wrap=True, overflow="crop")
    table.add_row(Text(f"so far ({scope})" if scope else "so far", style="dim"), Text("nats", style="dim"), Text("NLL per round", style="dim"))
    for label, value, history, style in series:
        table.add_row(Text(label, style=style), Text(_nll(value), style=style), Text(sparkline(history, spark_width, low, high), style="cyan"))
    table.add_row("", "", "")
    gain, comm = state.collective_gain, state.communication_gain
    table.add_row("gain vs best", _signed(gain), Text("ahead" if gain and gain > 0 else "behind" if gain and gain < 0 else "", style="dim"))
    table.add_row("gain vs silent", _signed(comm), Text("messages help" if comm and comm > 0 else "messages hurt" if comm and comm < 0 else "", style="dim"))
    return table


# ---------------------------------------------------------------------------- nodes


def _node_row(node: NodeState, max_message_bytes: int) -> list[Text]:
    budget = node.budget_use(max_message_bytes)
    status_style = {"ok": "green", "missed": "bold red", "silent": "dim", "hostile": "bold magenta"}.get(node.status, "")
    message = _printable(node.last_message) if node.last_message else ""
    return [
        Text(node.node_id, style="bold"),
        Text(node.info.model),
        Text(node.info.view),
        Text(_nll(node.nll_collective.mean)),
        Text(_nll(node.nll_isolated.mean), style="dim"),
        _signed(node.gain_from_messages),
        Text(_bytes(node.bytes_sent)),
        Text("-" if budget is None else f"{budget:.0%}"),
        Text(str(node.messages_dropped), style=BAD if node.messages_dropped else "dim"),
        Text(str(node.screened_out), style="yellow" if node.screened_out else "dim"),
        Text(node.status if not node.rounds_missed else f"{node.status} ({node.rounds_missed})", style=status_style),
        Text(message, style="italic"),
    ]


def node_table(state: LiveState, max_rows: int | None = None) -> Table:
    """One row per node (the first `max_rows`): model, view, NLL in the collective so far,
    isolated NLL, gain from messages (isolated minus collective), bytes sent and share of
    the byte budget used, messages the links dropped, messages its firewall dropped (fw),
    status (hostile: an attacker), last message."""
    hidden = 0 if max_rows is None else max(0, len(state.nodes) - max(1, max_rows))
    shown = state.nodes if not hidden else state.nodes[: max(1, max_rows or 1)]
    table = Table(
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        pad_edge=False,
        show_edge=False,
        expand=True,
        caption=f"… {hidden} more nodes (a taller terminal shows them)" if hidden else None,
        caption_justify="left",
    )
    for name, options in (
        ("node", {"max_width": 10}),
        ("model", {"max_width": 8}),
        ("view", {"max_width": 18}),
        ("NLL", {"justify": "right", "min_width": 5}),
        ("alone", {"justify": "right", "min_width": 5}),
        ("gain", {"justify": "right", "min_width": 6}),
        ("sent", {"justify": "right", "min_width": 6}),
        ("budget", {"justify": "right", "min_width": 4}),
        ("drop", {"justify": "right", "min_width": 4}),
        ("fw", {"justify": "right", "min_width": 2}),
        ("status", {"max_width": 11}),
        ("last message", {"ratio": 1, "min_width": 8}),
    ):
        table.add_column(name, no_wrap=True, overflow="ellipsis", **options)  # type: ignore[arg-type]
    max_bytes = state.start.max_message_bytes if state.start else 0
    for node in shown:
        table.add_row(*_node_row(node, max_bytes))
    return table


# ---------------------------------------------------------------------------- the whole screen


def _topology_height(n_nodes: int, height: int) -> int:
    wanted = min(17, max(9, n_nodes // 2 + 6))
    return max(6, min(wanted, height - 12))


def dashboard(state: LiveState, width: int = 100, height: int = 40, *, show_nodes: bool = True) -> RenderableType:
    """The whole live screen for a terminal of `width` x `height` cells."""
    head = header_view(state)
    if state.start is None:
        return head
    top_height = _topology_height(len(state.nodes), height)
    parts: list[RenderableType] = [head]
    if width >= SIDE_BY_SIDE_MIN_WIDTH:
        right_width = 44
        left_width = width - right_width - 1
        row = Table.grid(padding=(0, 1, 0, 0))
        row.add_column(width=left_width)
        row.add_column(width=right_width)
        row.add_row(topology_view(state, left_width, top_height), collective_view(state, right_width))
        parts.append(row)
        used = 2 + top_height
    else:
        parts += [topology_view(state, width, top_height), collective_view(state, width)]
        used = 2 + top_height + 8
    if show_nodes:
        # table head 2 lines, caption 1, one spare so the screen never scrolls
        parts.append(node_table(state, max_rows=max(1, height - used - 4)))
    return Group(*parts)
