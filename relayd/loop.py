"""The event loop relayd's processes run on: uvloop where it is installed, asyncio's own
otherwise, or when RELAYD_EVENT_LOOP=asyncio says so.

uvloop (libuv under asyncio's interface) does a session's socket reads, writes, timers and
callbacks in C: on the bench's load (bench/README.md, 2026-12-02 afternoon) it took 8-22 %
of relayd's CPU a message away for the same figures otherwise. relayd uses only asyncio's
public interface, so it runs the same on either; where the two loops behave differently
(accept() out of descriptors) relayd does the work itself (relayd.accept). The variable is
the way back to asyncio's loop should a uvloop bug ever show, without a new release.

On Windows (no uvloop there) the loop is asyncio's SelectorEventLoop, not the default
ProactorEventLoop: relayd's accept path (relayd.accept) waits for a listening socket to become
readable (add_reader) so that it can leave connections in the backlog when out of resources,
and the Proactor loop has no add_reader. Rejected: asyncio's own server on the Proactor loop,
which is the accept-failure behaviour relayd.accept exists to avoid. The cost: select() on
Windows takes at most 512 sockets (CPython's FD_SETSIZE there), so one process serves about
500 SMTP sessions at once, five times server.max_sessions' default.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "RELAYD_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's new_event_loop, or None for asyncio's default (RELAYD_EVENT_LOOP=asyncio,
    or uvloop not installed); on Windows asyncio's SelectorEventLoop (module docstring)."""
    if sys.platform == "win32":
        return asyncio.SelectorEventLoop
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
