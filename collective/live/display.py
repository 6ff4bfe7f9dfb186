"""The one `Live` loop: fold each event into a `LiveState` and redraw the dashboard.

`LiveDisplay` is what `collective run --live` hands the engine as `on_event`; `watch`
feeds it from any event iterator (a run folder's `events.jsonl` through
`collective.live.replay`, or a broker subscription), so a live run, a replay and a remote
run all show the same screen. Drawing happens only when an event arrives (no refresh
thread competing with the model for the CPU), and the time spent in it is counted in
`LiveDisplay.render_seconds` so its overhead on a run can be measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from types import TracebackType

from rich.console import Console, RenderableType
from rich.live import Live

from collective.live import LiveState, dashboard, round_line
from collective.records import RoundEvent, RunEnd, RunRecord, RunStart


class LiveDisplay:
    """A full-screen dashboard over a run; use as a context manager and call `update(event)`.

    On exit the screen is restored and a summary (header, topology, collective numbers,
    no node table) is printed so the last picture stays in the scrollback.
    """

    def __init__(
        self,
        run_start: RunStart | None,
        console: Console,
        *,
        screen: bool = True,
        summary_on_exit: bool = True,
    ) -> None:
        self.state = LiveState.empty() if run_start is None else LiveState.started(run_start)
        self.console = console
        self.summary_on_exit = summary_on_exit
        self.render_seconds = 0.0  # wall time spent folding and drawing, for overhead figures
        self.updates = 0
        self._live = Live(
            console=console,
            screen=screen,
            auto_refresh=False,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
            get_renderable=self._render,
        )

    def _render(self) -> RenderableType:
        width, height = self.console.size
        return dashboard(self.state, width, height)

    def __enter__(self) -> LiveDisplay:
        self._live.start(refresh=True)
        return self

    def update(self, event: RunRecord) -> None:
        """Fold one event in and redraw (the engine's `on_event`)."""
        began = time.perf_counter()
        self.state = self.state.apply(event)
        self._live.refresh()
        self.render_seconds += time.perf_counter() - began
        self.updates += 1

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._live.stop()
        if self.summary_on_exit and self.state.start is not None:
            width, height = self.console.size
            self.console.print(dashboard(self.state, width, height, show_nodes=False))


def watch(
    events: Iterable[RunRecord],
    console: Console,
    *,
    speed: float = 0.0,
    live: bool | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> LiveState:
    """Show an event stream as the run showed it; returns the final state.

    speed: replay pace as a multiple of the run's own round times (2.0 = twice as fast);
        0 shows events as fast as they come. Events that arrive slower than that pace
        (following a running run) are shown as they arrive.
    live: the full-screen view (default when the console is a terminal); otherwise one
        plain `round_line` per round.
    """
    use_live = console.is_terminal if live is None else live
    state = LiveState.empty()
    display: LiveDisplay | None = None
    last_shown = clock()
    try:
        for event in events:
            if isinstance(event, RoundEvent) and speed > 0:
                wait = event.wall_seconds / speed - (clock() - last_shown)
                if wait > 0:
                    sleep(wait)
            if use_live:
                if display is None:
                    display = LiveDisplay(None, console).__enter__()
                display.update(event)
                state = display.state
            else:
                state = state.apply(event)
                if isinstance(event, RoundEvent):
                    console.print(round_line(event, state.total_rounds or 0), highlight=False, soft_wrap=True)
                elif isinstance(event, RunEnd):
                    console.print(f"end {event.status} rounds={event.rounds_done}", highlight=False, soft_wrap=True)
            last_shown = clock()
    finally:
        if display is not None:
            display.__exit__(None, None, None)
    return state
