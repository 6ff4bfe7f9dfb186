"""The topology drawn in a character grid: nodes where a networkx layout puts them,
links as lines of box-drawing characters.

`topology_grid` is the pure drawing (state -> rows of (character, style) cells);
`topology_view` wraps it in a panel with a one-line legend. Each node's label is
coloured by its NLL this round (green = lowest among the nodes, red = highest); a link
that carried a message this round is drawn heavy and bright, a dropped one dashed
in red, an idle one dim. Labels never overlap: a label that would collide moves to the nearest
free cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich.color import Color
from rich.console import Group
from rich.panel import Panel
from rich.style import Style
from rich.text import Text

from collective.live.state import LiveState, NodeState
from collective.report.plots import node_positions

IDLE = Style(color="grey50")
ACTIVE = Style(color="bright_cyan", bold=True)
DROPPED = Style(color="red", bold=True)
HOSTILE = Style(color="magenta", bold=True)  # a message from an attacker (message policy `attack`)
SCREENED = Style(color="yellow", bold=True)  # a message the receiver's firewall dropped
MISSED = Style(dim=True, strike=True)
NO_DATA = Style(bold=True)
MAX_LABEL = 8
HOSTILE_MARK = "!"  # after an attacker's label: readable without colour

# link priority when two links cross one cell: an attack beats a message the firewall
# dropped, which beats a message, a drop and an idle link
_PRIORITY = {IDLE: 0, DROPPED: 1, ACTIVE: 2, SCREENED: 3, HOSTILE: 4}


@dataclass(frozen=True)
class Cell:
    char: str = " "
    style: Style | None = None


def nll_style(value: float | None, low: float, high: float) -> Style:
    """Green (lowest NLL among the nodes) through yellow to red (highest)."""
    if value is None or not math.isfinite(value):
        return NO_DATA
    t = 0.0 if high - low < 1e-9 else min(1.0, max(0.0, (value - low) / (high - low)))
    red = int(40 + 200 * min(1.0, 2 * t))
    green = int(210 * min(1.0, 2 * (1 - t)))
    return Style(color=Color.from_rgb(red, green, 40), bold=True)


def _label(node: NodeState) -> str:
    node_id = node.node_id
    label = node_id if len(node_id) <= MAX_LABEL else node_id[: MAX_LABEL - 1] + "…"
    return label + HOSTILE_MARK if node.hostile else label


def _link_style(state: LiveState, link: tuple[str, str], hostile: set[str]) -> Style:
    """A link's style this round: a message the receiver's firewall dropped, an attacker's
    message, a message, a drop on the link, or idle."""
    if link in state.screened_links:
        return SCREENED
    if link in state.active_links:
        return HOSTILE if link[0] in hostile else ACTIVE
    return DROPPED if link in state.dropped_links else IDLE


def _place_labels(
    labels: dict[str, str], positions: dict[str, tuple[float, float]], width: int, height: int
) -> dict[str, tuple[int, int]]:
    """Row and left column of each label, moved to the nearest free spot on collision."""
    longest = max((len(text) for text in labels.values()), default=1)
    taken: set[tuple[int, int]] = set()
    offsets = sorted(
        ((dr, dc) for dr in range(-2, 3) for dc in range(-6, 7)), key=lambda o: (2 * abs(o[0]) + abs(o[1]), o)
    )
    placed: dict[str, tuple[int, int]] = {}
    for node_id, text in labels.items():
        x, y = positions[node_id]
        row0 = round((1.0 - y) * (height - 1))
        col0 = round(x * max(0, width - longest)) + (longest - len(text)) // 2
        spot = (min(max(row0, 0), height - 1), min(max(col0, 0), max(0, width - len(text))))
        for dr, dc in offsets:
            row, col = row0 + dr, col0 + dc
            if not (0 <= row < height and 0 <= col <= width - len(text)):
                continue
            # one blank cell either side so neighbouring labels stay readable
            if all((row, c) not in taken for c in range(col - 1, col + len(text) + 1)):
                spot = (row, col)
                break
        placed[node_id] = spot
        taken.update((spot[0], c) for c in range(spot[1], spot[1] + len(text)))
    return placed


def _link_char(d_row: int, d_col: int, style: Style) -> str:
    angle = math.degrees(math.atan2(abs(d_row) * 2.0, abs(d_col)))  # a cell is about twice as tall as wide
    # heavy for a message, dashed for a drop: readable without colour too
    if style == SCREENED:
        return "×"  # stopped at the receiver
    if angle < 25:
        return "━" if style in (ACTIVE, HOSTILE) else "┄" if style == DROPPED else "─"
    if angle > 65:
        return "┃" if style in (ACTIVE, HOSTILE) else "┆" if style == DROPPED else "│"
    return "╲" if (d_row > 0) == (d_col > 0) else "╱"


def _arrow(d_row: int, d_col: int) -> str:
    angle = math.degrees(math.atan2(abs(d_row) * 2.0, abs(d_col)))
    if angle > 65:
        return "▼" if d_row > 0 else "▲"
    return "▶" if d_col > 0 else "◀"


def topology_grid(state: LiveState, width: int, height: int) -> list[list[Cell]]:
    """The drawing as `height` rows of `width` cells."""
    grid = [[Cell() for _ in range(width)] for _ in range(height)]
    if state.start is None or width < 3 or height < 1:
        return grid
    nodes = {node.node_id: node for node in state.nodes}
    labels = {node_id: _label(node) for node_id, node in nodes.items()}
    hostile = {node_id for node_id, node in nodes.items() if node.hostile}
    positions = node_positions(list(nodes), state.start.edges)
    spots = _place_labels(labels, positions, width, height)
    centre = {n: (row, col + len(labels[n]) // 2) for n, (row, col) in spots.items()}
    edge_set = set(state.start.edges)

    # one line per unordered pair; its style is the busiest direction's
    pairs: dict[tuple[str, str], Style] = {}
    for a, b in state.start.edges:
        if a == b or a not in centre or b not in centre:
            continue
        key = (a, b) if a <= b else (b, a)
        style = _link_style(state, (a, b), hostile)
        if key not in pairs or _PRIORITY[style] > _PRIORITY[pairs[key]]:
            pairs[key] = style
    label_cells = {(row, c) for n, (row, col) in spots.items() for c in range(col, col + len(labels[n]))}
    for (a, b), style in sorted(pairs.items(), key=lambda item: _PRIORITY[item[1]]):
        if state.start.directed and (b, a) in edge_set and (a, b) not in edge_set:
            a, b = b, a
        (r0, c0), (r1, c1) = centre[a], centre[b]
        d_row, d_col = r1 - r0, c1 - c0
        steps = max(abs(d_row), abs(d_col))
        char = _link_char(d_row, d_col, style)
        one_way = state.start.directed and (b, a) not in edge_set
        cells = [(round(r0 + d_row * i / steps), round(c0 + d_col * i / steps)) for i in range(1, steps)]
        cells = [cell for cell in cells if cell not in label_cells]
        for index, (row, col) in enumerate(cells):
            shown = _arrow(d_row, d_col) if one_way and index == len(cells) - 1 else char
            grid[row][col] = Cell(shown, style)

    finite = [n.last_nll for n in state.nodes if n.last_nll is not None and math.isfinite(n.last_nll)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    for node_id, (row, col) in spots.items():
        node: NodeState = nodes[node_id]
        style = MISSED if node.missed_now else nll_style(node.last_nll, low, high)
        for offset, char in enumerate(labels[node_id]):
            if col + offset < width:
                grid[row][col + offset] = Cell(char, style)
    return grid


def grid_text(grid: list[list[Cell]]) -> Text:
    """Rows of cells as one rich Text, runs of one style merged."""
    text = Text(no_wrap=True, overflow="crop")
    for index, row in enumerate(grid):
        if index:
            text.append("\n")
        run, run_style = "", None
        for cell in row:
            if cell.style != run_style and run:
                text.append(run, run_style)
                run = ""
            run += cell.char
            run_style = cell.style
        text.append(run.rstrip() if run_style is None else run, run_style)
    return text


def _legend(state: LiveState) -> Text:
    finite = [n.last_nll for n in state.nodes if n.last_nll is not None and math.isfinite(n.last_nll)]
    legend = Text(no_wrap=True, overflow="ellipsis")
    if finite:
        low, high = min(finite), max(finite)
        legend.append("NLL/byte " if state.unit == "byte" else "NLL ")
        legend.append(f"{low:.2f}", nll_style(low, low, high))
        legend.append("→")
        legend.append(f"{high:.2f}", nll_style(high, low, high))
        legend.append("  ")
    legend.append("━", ACTIVE)
    legend.append(" message  ")
    legend.append("┄", DROPPED)
    legend.append(" dropped  ")
    legend.append("─", IDLE)
    legend.append(" idle")
    if any(node.hostile for node in state.nodes):
        legend.append("  ")
        legend.append("━", HOSTILE)
        legend.append(f" attack ({HOSTILE_MARK})")
    if any(node.screened_out for node in state.nodes) or state.screened_links:
        legend.append("  ")
        legend.append("×", SCREENED)
        legend.append(" firewall drop")
    return legend


def topology_view(state: LiveState, width: int, height: int) -> Panel:
    """A panel `width` columns wide, `height` lines tall (borders and legend included)."""
    inner_width, inner_height = max(3, width - 4), max(1, height - 3)
    n_edges = len({(a, b) if a <= b else (b, a) for a, b in state.start.edges}) if state.start else 0
    title = f"topology: {len(state.nodes)} nodes, {n_edges} links" if state.start else "topology"
    body = Group(grid_text(topology_grid(state, inner_width, inner_height)), _legend(state))
    return Panel(body, title=title, title_align="left", width=width, height=height, padding=(0, 1))
