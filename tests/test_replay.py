"""Reading events.jsonl: whole, half-written, and growing while a run writes it."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from collective.cli import main
from collective.live.replay import EventReader, ReplayError, follow_events, read_events, run_events
from collective.records import RoundEvent, RunEnd, RunStart
from collective.run.rundir import INCOMPLETE
from tests.test_live import synthetic_run


def write_run(folder: Path, events: list, *, complete: bool = True, partial: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(event.model_dump_json() + "\n" for event in events)
    (folder / "events.jsonl").write_text(text + partial, encoding="utf-8")
    if not complete:
        (folder / INCOMPLETE).write_text("the run is in progress\n", encoding="utf-8")
    return folder


def test_read_events_returns_every_event_in_order(tmp_path):
    events = synthetic_run()
    write_run(tmp_path, events)
    assert read_events(tmp_path / "events.jsonl") == events


def test_read_events_ignores_a_half_written_last_line(tmp_path):
    events = synthetic_run()
    cut = events[3].model_dump_json()[:57]
    write_run(tmp_path, events[:3], partial=cut)
    assert read_events(tmp_path / "events.jsonl") == events[:3]


def test_the_reader_completes_a_line_once_the_writer_finishes_it(tmp_path):
    events = synthetic_run()
    path = tmp_path / "events.jsonl"
    line = events[1].model_dump_json() + "\n"
    path.write_text(events[0].model_dump_json() + "\n" + line[:40], encoding="utf-8")
    with EventReader(path) as reader:
        assert reader.poll() == [events[0]]
        with path.open("a", encoding="utf-8") as handle:
            handle.write(line[40:])
        assert reader.poll() == [events[1]]
        assert reader.poll() == []


def test_a_corrupt_line_is_an_error_naming_the_file_and_line(tmp_path):
    events = synthetic_run()
    write_run(tmp_path, events[:2], partial='{"kind": "round", "oops": 1}\n')
    with pytest.raises(ReplayError, match=r"events.jsonl:3: not a run event"):
        read_events(tmp_path / "events.jsonl")


def test_an_event_from_a_newer_schema_asks_for_an_upgrade(tmp_path):
    start = synthetic_run()[0]
    newer = start.model_dump_json().replace('"schema_version":1', '"schema_version":2').replace("}", ',"x":1}', 1)
    write_run(tmp_path, [], partial=newer + "\n")
    with pytest.raises(ReplayError, match="newer"):
        read_events(tmp_path / "events.jsonl")


def test_following_a_growing_file_yields_events_as_they_are_written_until_the_run_ends(tmp_path):
    events = synthetic_run(rounds=4)
    path = tmp_path / "events.jsonl"
    path.write_text("", encoding="utf-8")

    def writer() -> None:
        with path.open("a", encoding="utf-8") as handle:
            for event in events:
                text = event.model_dump_json() + "\n"
                handle.write(text[:25])  # half a line first, as a slow writer would leave it
                handle.flush()
                time.sleep(0.01)
                handle.write(text[25:])
                handle.flush()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = list(follow_events(path, poll_seconds=0.005, idle_timeout=10))
    thread.join()
    assert seen == events and isinstance(seen[-1], RunEnd)


def test_following_stops_when_the_run_is_no_longer_going(tmp_path):
    events = synthetic_run()[:3]  # killed: no RunEnd
    write_run(tmp_path, events)
    seen = list(follow_events(tmp_path / "events.jsonl", still_running=lambda: False, poll_seconds=0.001))
    assert seen == events


def test_following_gives_up_after_the_idle_timeout(tmp_path):
    write_run(tmp_path, synthetic_run()[:2])
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    seen = list(follow_events(tmp_path / "events.jsonl", idle_timeout=3.0, sleep=sleep, clock=lambda: now[0]))
    assert len(seen) == 2 and now[0] > 3.0


def test_run_events_follows_a_folder_marked_incomplete_and_reads_a_finished_one_once(tmp_path):
    finished = write_run(tmp_path / "done", synthetic_run())
    assert isinstance(list(run_events(finished))[-1], RunEnd)
    going = write_run(tmp_path / "going", synthetic_run()[:3], complete=False)
    seen = list(run_events(going, idle_timeout=0.05, poll_seconds=0.01))
    assert [type(e) for e in seen] == [RunStart, RoundEvent, RoundEvent]


# ---------------------------------------------------------------------------- collective watch


def test_watch_replays_a_finished_run_as_plain_lines_through_a_pipe(tmp_path, capsys):
    write_run(tmp_path / "run", synthetic_run(rounds=3))
    assert main(["watch", str(tmp_path / "run"), "--speed", "0", "--no-live"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[:3]] == ["1/3", "2/3", "3/3"]
    assert "end complete rounds=3" in lines


def test_watch_of_a_folder_without_events_is_a_user_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["watch", str(tmp_path / "empty")]) == 2
    assert "no events.jsonl" in capsys.readouterr().err


def test_watch_broker_with_nothing_listening_says_which_step_failed_and_what_to_do(capsys):
    from tests.mosquitto import free_port

    port = free_port()  # nothing listens there
    assert main(["watch", "--broker", f"mqtt://watcher:pw@127.0.0.1:{port}", "--run", "r1", "--no-live"]) == 2
    out = " ".join(capsys.readouterr().err.split())
    assert "cannot watch run r1" in out and "step 'TCP'" in out and f"127.0.0.1:{port}" in out and "start the broker" in out
    assert "pw" not in out


def test_watch_broker_needs_a_run_id(capsys):
    assert main(["watch", "--broker", "mqtt://127.0.0.1:1"]) == 2
    assert "--run RUN_ID" in capsys.readouterr().err


def test_the_live_watch_draws_the_dashboard_on_a_terminal(tmp_path):
    from collective.live.display import watch

    console = Console(file=io.StringIO(), width=100, height=40, color_system=None, force_terminal=True)
    state = watch(list(run_events(write_run(tmp_path, synthetic_run()))), console, live=True)
    assert state.finished and "round 6/6" in console.file.getvalue()  # type: ignore[attr-defined]


def test_a_run_file_of_events_4_and_5_lines_reads_whole(tmp_path):
    """An older run's rounds (events 4: no unit, read as token) beside events 5 byte rounds."""
    events = synthetic_run(rounds=3)
    old = [e.model_copy(update={"schema_version": 4}) for e in events[:2]]
    new = [e.model_copy(update={"unit": "byte"}) if isinstance(e, RoundEvent) else e for e in events[2:]]
    lines = [e.model_dump_json(exclude={"unit"}) for e in old] + [e.model_dump_json() for e in new]
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    read = read_events(tmp_path / "events.jsonl")
    assert [getattr(e, "unit", None) for e in read if isinstance(e, RoundEvent)] == ["token", "byte", "byte"]
    assert [e.schema_version for e in read][:2] == [4, 4]
