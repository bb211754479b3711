"""The event loop relayd's processes run on: uvloop where it is installed, asyncio's own
otherwise, or when RELAYD_EVENT_LOOP=asyncio says so.

uvloop (libuv under asyncio's interface) does a session's socket reads, writes, timers and
callbacks in C: on the bench's load (bench/README.md, 2026-12-02 afternoon) it took 8-22 %
of relayd's CPU a message away for the same figures otherwise. relayd uses only asyncio's
public interface, so it runs the same on either; where the two loops behave differently
(accept() out of descriptors) relayd does the work itself (relayd.accept). The variable is
the way back to asyncio's loop should a uvloop bug ever show, without a new release.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "RELAYD_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's new_event_loop, or None for asyncio's default (RELAYD_EVENT_LOOP=asyncio,
    or uvloop not installed)."""
    if os.environ.get(ENV, "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on the loop loop_factory() picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def name() -> str:
    """What the running loop is, for the start-up line: "uvloop" or "asyncio"."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") \
        else "asyncio"
