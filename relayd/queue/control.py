"""Control requests: `relayd queue retry|delete` and `relayd reload` leave an empty file in the
queue's control/ directory, named ACTION.TARGET.RANDOM; the running daemon takes each (the queue
manager QUEUE_ACTIONS, the daemon's lifecycle "reload") and removes it once taken. A file
system drop box rather than a socket: it works whether the daemon is up or not, and the same
on Windows."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from relayd.platform import fs

QUEUE_ACTIONS = ("retry", "delete")  # control/ requests the queue manager takes
CONTROL_ACTIONS = (*QUEUE_ACTIONS, "reload")  # and the daemon's lifecycle ("reload")


def leave_request(control_dir: Path, tmp_dir: Path, action: str, target: str) -> Path:
    """Leave a request for the daemon; it deletes the file once done."""
    path = control_dir / f"{action}.{target}.{secrets.token_hex(4)}"
    fs.write_atomic(path, b"", tmp_dir)
    return path


def take_requests(control_dir: Path,
                  actions: Sequence[str] = QUEUE_ACTIONS) -> list[tuple[str, str]]:
    """The requests for `actions`, oldest first, each removed as it is taken. The queue
    manager takes QUEUE_ACTIONS (and anything unknown, which it drops); the daemon's
    lifecycle takes "reload" (`relayd reload`), so one never eats the other's."""
    try:
        names = sorted(os.listdir(control_dir))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        parts = name.split(".")
        if parts[0] in CONTROL_ACTIONS and parts[0] not in actions:
            continue  # another taker's
        with contextlib.suppress(OSError):
            fs.unlink(control_dir / name)
        if len(parts) == 3 and parts[0] in actions:
            out.append((parts[0], parts[1]))
    return out
