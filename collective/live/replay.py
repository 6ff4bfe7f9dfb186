"""Reading a run's `events.jsonl`, finished or still being written.

The runner appends one JSON event per line and flushes each round, so a reader can meet a
last line that is only half written. `EventReader` reads whatever complete lines the file
holds now and keeps an unfinished tail for the next `poll()`; `read_events` reads a file
once (ignoring a partial last line); `follow_events` keeps polling a growing file until
the run ends:

    events.jsonl --EventReader.poll()--> [RunStart, RoundEvent, ..., RunEnd]
                 --follow_events()-----> the same, one at a time, as the run writes them
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from pydantic import ValidationError

from collective.records import EVENT_SCHEMA_VERSION, INCOMPLETE, RunEnd, RunRecord, parse_event

log = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"


class ReplayError(Exception):
    """An events file cannot be read; the message names the file and line, for the user."""


def _parse(line: str, path: Path, line_number: int) -> RunRecord:
    try:
        return parse_event(line)
    except ValidationError as exc:
        version = None
        with contextlib.suppress(ValueError, AttributeError):
            version = json.loads(line).get("schema_version")
        if isinstance(version, int) and version > EVENT_SCHEMA_VERSION:
            raise ReplayError(
                f"{path}:{line_number}: event schema version {version} is newer than this collective "
                f"reads ({EVENT_SCHEMA_VERSION}); upgrade collective to watch this run"
            ) from None
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the line"
        raise ReplayError(f"{path}:{line_number}: not a run event ({where}: {first['msg']})") from None


class EventReader:
    """Incremental reader: each `poll()` returns the events completed since the last one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._tail = ""
        self.lines_read = 0

    def poll(self) -> list[RunRecord]:
        if self._file is None:
            if not self.path.exists():
                return []
            self._file = self.path.open("r", encoding="utf-8", newline="\n")
        chunk = self._file.read()
        if not chunk:
            return []
        text = self._tail + chunk
        *complete, self._tail = text.split("\n")
        events = []
        for line in complete:
            self.lines_read += 1
            if line.strip():
                events.append(_parse(line, self.path, self.lines_read))
        return events

    @property
    def pending(self) -> str:
        """The unfinished last line, if the writer is mid-line."""
        return self._tail

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> EventReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(path: Path) -> list[RunRecord]:
    """Every complete event in the file now; a half-written last line is left out."""
    if not path.exists():
        raise ReplayError(f"{path}: no such file (is this a run folder?)")
    with EventReader(path) as reader:
        events = reader.poll()
        if reader.pending.strip():
            log.debug("%s: ignoring a partial last line (%d characters)", path, len(reader.pending))
    return events


def follow_events(
    path: Path,
    *,
    still_running: Callable[[], bool] = lambda: True,
    poll_seconds: float = 0.25,
    idle_timeout: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[RunRecord]:
    """Events as the run writes them, until a `RunEnd`, until `still_running()` is false
    and the file has nothing more, or until `idle_timeout` seconds pass with no event."""
    last_event = clock()
    with EventReader(path) as reader:
        while True:
            events = reader.poll()
            for event in events:
                yield event
                if isinstance(event, RunEnd):
                    return
            if events:
                last_event = clock()
                continue
            if not still_running():
                # the writer may have finished between our read and the check: read once more
                for event in reader.poll():
                    yield event
                return
            if idle_timeout is not None and clock() - last_event > idle_timeout:
                log.warning("%s: no new event for %.0f s; stopped following", path, idle_timeout)
                return
            sleep(poll_seconds)


def run_is_going(run_dir: Path) -> bool:
    """True while the run folder is marked INCOMPLETE (running, or killed without a word)."""
    return (run_dir / INCOMPLETE).exists()


def run_events(
    run_dir: Path,
    *,
    follow: bool | None = None,
    poll_seconds: float = 0.25,
    idle_timeout: float | None = None,
) -> Iterator[RunRecord]:
    """A run folder's events: followed while the run is going (default), read once otherwise."""
    path = run_dir / EVENTS_FILE
    if not run_dir.is_dir():
        raise ReplayError(f"{run_dir}: no such run folder")
    follow = run_is_going(run_dir) if follow is None else follow
    if not follow:
        yield from read_events(path)
        return
    yield from follow_events(
        path, still_running=lambda: run_is_going(run_dir), poll_seconds=poll_seconds, idle_timeout=idle_timeout
    )
