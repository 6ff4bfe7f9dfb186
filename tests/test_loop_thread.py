"""The loop-thread bridge: synchronous code running coroutines on a background asyncio loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from collective.distributed.loop_thread import LoopThread


def test_a_call_runs_on_the_loop_thread_and_returns_its_result_or_raises_its_error():
    thread = LoopThread("test-loop").start()
    try:

        async def where() -> str:
            await asyncio.sleep(0)
            return threading.current_thread().name

        async def broken() -> None:
            raise ValueError("from the loop")

        assert thread.call(where()) == "test-loop"
        with pytest.raises(ValueError, match="from the loop"):
            thread.call(broken())
    finally:
        thread.stop()


def test_a_call_that_times_out_is_cancelled_on_the_loop():
    thread = LoopThread("test-loop").start()
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    try:
        with pytest.raises(TimeoutError):
            thread.call(forever(), timeout=0.1)
        assert cancelled.wait(5)
    finally:
        thread.stop()


def test_stop_cancels_what_still_runs_lets_it_clean_up_and_closes_the_loop():
    thread = LoopThread("test-loop").start()
    started, cleaned = threading.Event(), threading.Event()

    async def background() -> None:
        try:
            started.set()
            await asyncio.sleep(60)
        finally:
            cleaned.set()

    thread.submit(background())
    assert started.wait(5)
    heard: list[int] = []
    assert thread.call_soon(heard.append, 1)
    thread.stop()
    assert cleaned.is_set() and heard == [1]
    assert not thread.alive and thread.loop.is_closed()
    assert not thread.call_soon(heard.append, 2)  # the loop is gone: nothing is handed over
    thread.stop()  # idempotent


def test_a_thread_never_started_stops_without_waiting():
    thread = LoopThread("never")
    thread.stop()
    assert thread.loop.is_closed() and not thread.alive
