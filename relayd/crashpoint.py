"""Fault injection for the crash tests: with `RELAYD_CRASH_AT=STEP` in its environment, the
process kills itself when it reaches STEP (SIGKILL; TerminateProcess on Windows), exactly as an
outside `kill -9` or `taskkill /F` at that moment would. Steps: `accepted`, `reported`,
`bounce-stored`, `before-removal`. Unset (always, in production) it costs one string comparison.
"""

from __future__ import annotations

import os

from relayd.platform import proc

CRASH_AT = os.environ.get("RELAYD_CRASH_AT", "")


def reached(step: str) -> None:
    if CRASH_AT and CRASH_AT == step:
        proc.kill_self()
