"""Fault injection for the crash tests: with `RELAYD_CRASH_AT=STEP` in its environment, the
process kills itself with SIGKILL when it reaches STEP, exactly as an outside `kill -9` at that
moment would. Steps: `accepted`, `reported`, `bounce-stored`, `before-removal`. Unset (always, in
production) it costs one string comparison."""

from __future__ import annotations

import os
import signal

CRASH_AT = os.environ.get("RELAYD_CRASH_AT", "")


def reached(step: str) -> None:
    if CRASH_AT and CRASH_AT == step:
        os.kill(os.getpid(), signal.SIGKILL)
