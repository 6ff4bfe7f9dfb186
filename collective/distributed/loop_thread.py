"""An asyncio loop on a background thread, for synchronous code that drives async MQTT work.

The round engine and `collective watch` are synchronous; the connection to the broker is
async. A `LoopThread` owns one event loop on a daemon thread: `call` runs a coroutine there
and waits for its result, `submit` runs one without waiting, `call_soon` hands a plain
callback over. `stop` cancels what is still running on the loop (letting it clean up),
closes the loop and joins the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class LoopThread:
    """One event loop running on its own daemon thread (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> LoopThread:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result (or its exception); cancelled on a
        timeout or when the waiting thread is interrupted (Ctrl-C)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run `coro` on the loop without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call_soon(self, callback: Callable[..., object], *args: object) -> bool:
        """Hand `callback(*args)` to the loop; False when the loop is gone."""
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed
            return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what still runs on the loop, close it and join the thread (idempotent)."""
        if not self._thread.is_alive():
            if self._thread.ident is None and not self.loop.is_closed():  # never started
                self.loop.close()
            return
        self.call_soon(self.loop.stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the %s thread did not stop within %.0f s", self._thread.name, timeout)

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:  # what asyncio.run does on its way out: cancel the rest and let it finish
            with contextlib.suppress(Exception):
                pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
