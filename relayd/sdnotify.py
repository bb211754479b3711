"""systemd service notifications (sd_notify): READY, STOPPING, STATUS and the watchdog.

Every function is a no-op when $NOTIFY_SOCKET is unset (not started by systemd with
Type=notify), and never raises: a notification that cannot be sent is logged and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
SEND_TIMEOUT_S = 1.0
MAX_STATUS_CHARS = 200


def _socket_address() -> str | bytes | None:
    path = os.environ.get(NOTIFY_SOCKET_ENV)
    if not path or not hasattr(socket, "SOCK_CLOEXEC"):  # systemd's: POSIX only
        return None
    if path.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of '@'.
        return b"\0" + path[1:].encode()
    if path.startswith("/"):
        return path
    log.debug("ignoring unsupported %s=%r", NOTIFY_SOCKET_ENV, path)
    return None


def notify(*assignments: str) -> bool:
    """Send "KEY=value" assignments in one datagram. True if sent, False if not (or no-op)."""
    address = _socket_address()
    if address is None:
        return False
    for item in assignments:
        if "=" not in item or "\n" in item:
            raise ValueError(f"not a KEY=value notification: {item!r}")
    data = "\n".join(assignments).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.sendto(data, address)
    except OSError as e:
        log.warning("cannot notify systemd: %s", e.strerror or e)
        return False
    return True


def _status(text: str) -> str:
    # One line, bounded: systemctl status shows it as is.
    flat = " ".join(text.split())
    return "STATUS=" + flat[:MAX_STATUS_CHARS]


def ready(status: str | None = None) -> bool:
    """Tell systemd the service is up (listening); optionally with a status line."""
    return notify("READY=1", *([_status(status)] if status else []))


def reloading(status: str | None = None) -> bool:
    """The config is being reloaded; send ready() again when done."""
    return notify("RELOADING=1", *([_status(status)] if status else []))


def stopping(status: str | None = None) -> bool:
    """Shutdown has begun (draining)."""
    return notify("STOPPING=1", *([_status(status)] if status else []))


def status(text: str) -> bool:
    """Free-form status line for `systemctl status`."""
    return notify(_status(text))


def watchdog() -> bool:
    """Keep-alive ping for WatchdogSec=."""
    return notify("WATCHDOG=1")


def watchdog_timeout() -> float | None:
    """Seconds after which systemd kills a silent service ($WATCHDOG_USEC), or None if the
    watchdog is off or meant for another process ($WATCHDOG_PID)."""
    usec_text = os.environ.get(WATCHDOG_USEC_ENV)
    if not usec_text:
        return None
    pid_text = os.environ.get(WATCHDOG_PID_ENV)
    if pid_text:
        try:
            if int(pid_text) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.debug("ignoring malformed %s=%r", WATCHDOG_USEC_ENV, usec_text)
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000


def watchdog_interval() -> float | None:
    """How often to ping: half the timeout, as sd_watchdog_enabled(3) recommends; None if off."""
    timeout = watchdog_timeout()
    return None if timeout is None else timeout / 2


async def watchdog_loop() -> None:
    """Ping the watchdog every watchdog_interval(); returns at once when the watchdog is off.

    Runs until cancelled. It checks only that the event loop is alive: a blocked loop stops the
    pings and systemd restarts the service. It does not tie pings to /healthz, because a
    restart does not cure a full disk and would turn it into a restart loop.
    """
    interval = watchdog_interval()
    if interval is None or _socket_address() is None:
        return
    while True:
        watchdog()
        await asyncio.sleep(interval)
