"""The one thread on which a volunteer process runs its forward passes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Every forward pass of this process runs on this one thread. `asyncio.to_thread` hands work to
# whichever pool thread is free, and each new thread that calls into torch gets its own OpenMP
# team: a host's rounds then competed with idle teams of earlier rounds (bench/bus.py measured
# a one-host round's compute 1066 ms against the embedded node pass's 756 ms).
_COMPUTE = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="collective-compute")


async def on_compute_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`function(*args, **kwargs)` on the process's one compute thread."""
    return await asyncio.get_running_loop().run_in_executor(_COMPUTE, functools.partial(function, *args, **kwargs))
