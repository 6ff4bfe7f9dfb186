"""The read-only watcher's ordering and parsing, without a broker (the real one: test_distributed.py)."""

from __future__ import annotations

import time

import pytest

from collective.distributed.mqtt import parse_broker_url
from collective.distributed.payloads import ControlPayload, EventPayload, MessagePayload
from collective.distributed.protocol import PROTOCOL_SCHEMA_VERSION, Topics, encode, envelope
from collective.distributed.watcher import EventSequencer, EventSubscription, NoSuchRun
from collective.records import MessageRecord, NodeInfo, NodeRound, RoundEvent, RunEnd, RunStart

RUN = "run-1"
TOPICS = Topics(RUN)


def _start(run_id: str = RUN) -> RunStart:
    return RunStart(
        run_id=run_id, scenario="s", seed=1,
        nodes=[NodeInfo(node_id=n, model="tiny", view="window 8", message_policy="relay", controller="none") for n in "ab"],
        edges=[("a", "b"), ("b", "a")], directed=False, warmup_rounds=1, eval_rounds=3, round_tokens=8,
        max_message_tokens=4, max_message_bytes=32, aggregator="mean", runtime="mqtt",
    )


def _round(index: int, nll: float = 2.0) -> RoundEvent:
    return RoundEvent(
        run_id=RUN, round_index=index, phase="warmup" if index == 0 else "eval", eval_round=None if index == 0 else index - 1,
        start_token=8 * index, n_tokens=8,
        nodes=[NodeRound(node_id="a", nll_collective=nll, nll_isolated=2.5, nll_plain=2.6, last_message="hi\n"),
               NodeRound(node_id="b", nll_collective=None, nll_isolated=None, nll_plain=None, missed=True)],
        messages=[MessageRecord(sender="a", receiver="b", round_sent=index, deliver_round=index + 1, text="hi", n_tokens=1, n_bytes=2)],
        nll_collective=nll, nll_silent=2.2, nll_reference=1.9, wall_seconds=0.5, elapsed_seconds=0.5 * (index + 1),
    )


def _end(rounds: int = 4) -> RunEnd:
    return RunEnd(run_id=RUN, status="complete", rounds_done=rounds)


def _wire(record: RunStart | RoundEvent | RunEnd, sender: str = "coordinator", run_id: str = RUN) -> tuple[str, bytes]:
    index = record.round_index if isinstance(record, RoundEvent) else -1
    return TOPICS.event(record.kind), encode(envelope(run_id, sender, EventPayload(record=record), index))


def _control(state: str, detail: str = "") -> tuple[str, bytes]:
    return TOPICS.control, encode(envelope(RUN, "coordinator", ControlPayload(state=state, session="s1", detail=detail)))  # type: ignore[arg-type]


def _feed(sequencer: EventSequencer, items: list[tuple[str, bytes]]) -> list:
    return [record for topic, raw in items for record in sequencer.feed(topic, raw)]


def test_records_come_out_as_the_run_wrote_them_start_rounds_end():
    records = [_start(), _round(0), _round(1), _round(2, nll=float("nan")), _round(3), _end()]
    shown = _feed(EventSequencer(RUN), [_wire(r) for r in records])
    assert [r.model_dump_json() for r in shown] == [r.model_dump_json() for r in records]  # NaN survives the wire


def test_a_start_republished_after_a_reconnect_and_a_repeated_round_are_shown_once():
    sequencer = EventSequencer(RUN)
    items = [_wire(_start()), _wire(_round(0)), _wire(_start()), _wire(_round(0)), _wire(_round(1)), _wire(_end()), _wire(_round(2))]
    shown = _feed(sequencer, items)
    assert [r.kind for r in shown] == ["start", "round", "round", "end"] and sequencer.done
    assert [r.round_index for r in shown if isinstance(r, RoundEvent)] == [0, 1]


def test_rounds_that_arrive_before_the_start_wait_for_it():
    sequencer = EventSequencer(RUN)
    assert _feed(sequencer, [_wire(_round(3)), _wire(_round(2))]) == [] and sequencer.seen_run
    shown = _feed(sequencer, [_wire(_start())])
    assert [r.kind for r in shown] == ["start", "round", "round"] and [r.round_index for r in shown[1:]] == [2, 3]


def test_invalid_payloads_are_skipped_and_counted_never_raised():
    sequencer = EventSequencer(RUN)
    record = MessageRecord(sender="a", receiver="b", round_sent=0, deliver_round=1, text="x", n_tokens=1, n_bytes=1)
    bad = [
        (TOPICS.event("start"), b"not json"),
        (TOPICS.event("start"), b'{"schema_version": %d}' % PROTOCOL_SCHEMA_VERSION),  # this protocol's version, but no envelope
        (TOPICS.event("start"), b'{"schema_version": 99, "kind": "event"}'),
        _wire(_start(), sender="a"),  # spoofed
        _wire(_start(), run_id="run-2"),  # another run's envelope
        (TOPICS.event("start"), _wire(_start(run_id="run-2"))[1].replace(b'"run_id":"run-2","round', b'"run_id":"run-1","round')),
        (TOPICS.event("round"), _wire(_start())[1]),  # a start on the round topic
        (TOPICS.event("start"), encode(envelope(RUN, "coordinator", MessagePayload(record=record)))),
        (TOPICS.control, _wire(_start())[1]),
        (TOPICS.event("start"), b""),  # a cleared retained record: not even counted
        ("collective/run-1/coord/scenario", b"whatever"),  # not a watcher topic: ignored
    ]
    assert _feed(sequencer, bad) == [] and sequencer.start is None
    counts = sequencer.rejections.as_dict()
    assert counts == {"malformed": 2, "wrong_schema": 1, "spoofed": 1, "wrong_run": 2, "unexpected": 3}
    assert [r.kind for r in _feed(sequencer, [_wire(_start())])] == ["start"]


def _offline(run_id: str = RUN, **kwargs: float) -> EventSubscription:
    """A subscription fed by hand: no thread, no broker."""
    subscription = EventSubscription(parse_broker_url("mqtt://watcher@127.0.0.1:1"), run_id, **kwargs)  # type: ignore[arg-type]
    subscription._subscribed_at = time.monotonic()
    return subscription


def _put(subscription: EventSubscription, items: list[tuple[str, bytes]]) -> None:
    for topic, raw in items:
        subscription._inbox.put(("message", topic, raw))


def test_the_iterator_yields_in_order_and_stops_after_the_end():
    subscription = _offline()
    records = [_start(), _round(1), _round(2), _end()]
    _put(subscription, [_control("open")] + [_wire(r) for r in records] + [_wire(_round(3))])
    assert [r.model_dump_json() for r in subscription] == [r.model_dump_json() for r in records]


def test_no_sign_of_the_run_within_the_timeout_says_no_such_run_is_live():
    subscription = _offline(start_timeout=0.3)
    began = time.monotonic()
    with pytest.raises(NoSuchRun, match="no run 'run-1' is live on the broker at mqtt://watcher@127.0.0.1:1.*watcher user"):
        next(subscription)
    assert 0.25 < time.monotonic() - began < 3


def test_a_run_that_ended_before_its_first_round_says_so(monkeypatch):
    monkeypatch.setattr("collective.distributed.watcher.END_GRACE_S", 0.2)
    subscription = _offline(start_timeout=0.2)
    _put(subscription, [_control("ended", "failed: nodes a did not join")])
    with pytest.raises(NoSuchRun, match="ended before its first round .failed: nodes a did not join"):
        next(subscription)


def test_a_coordinator_still_waiting_for_its_nodes_is_waited_for(monkeypatch):
    monkeypatch.setattr("collective.distributed.watcher.END_GRACE_S", 0.2)
    subscription = _offline(start_timeout=0.2)
    _put(subscription, [_control("open")])
    import threading

    timer = threading.Timer(0.6, lambda: _put(subscription, [_wire(_start()), _wire(_round(0))]))
    timer.start()
    assert [r.kind for r in (next(subscription), next(subscription))] == ["start", "round"]
    timer.join()
    _put(subscription, [_control("ended", "interrupted")])  # and no end record: stop after the grace
    assert list(subscription) == []


def test_with_an_idle_timeout_the_iterator_stops_when_no_round_comes():
    subscription = _offline(start_timeout=5, idle_timeout=0.3)
    _put(subscription, [_wire(_start())])
    assert next(subscription).kind == "start"
    began = time.monotonic()
    assert list(subscription) == [] and time.monotonic() - began < 3
