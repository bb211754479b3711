"""The process, the same to relayd on POSIX and on Windows: stop and reload requests,
readiness, whether listener workers exist, and the crash tests' self-kill.

- Stop (drain, then exit; a second request exits at once): POSIX SIGTERM and SIGINT; Windows
  Ctrl+C (SIGINT), Ctrl+Break and the console closing (SIGBREAK), and the service manager's
  stop, which relayd.winservice passes to `Requests.stop` from its own thread.
- Reload: POSIX SIGHUP. On every platform `relayd reload` leaves a request in the spool's
  control/ folder, which the daemon polls as the queue manager polls `queue retry`'s
  (relayd.app); Windows has no signal for it.
- Readiness: systemd's sd_notify on POSIX (relayd.sdnotify; inert without $NOTIFY_SOCKET).
  On Windows the service sets a hook (`set_status_hook`) and reports RUNNING when `ready`
  comes, so `sc start` returns once relayd listens.
- Listener workers (relayd.workers) are POSIX only: they inherit the listening sockets
  through pass_fds and are told to reload and stop by signals. On Windows there is one
  process (server.workers "auto" is 1 there).
"""

from __future__ import annotations

import asyncio
import getpass
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from relayd import sdnotify
from relayd.platform import WINDOWS

WORKERS = not WINDOWS

StatusHook = Callable[[str, str], None]  # (state: ready|reloading|stopping, text)
_status_hook: StatusHook | None = None


def set_status_hook(hook: StatusHook | None) -> None:
    """Windows service: called with each readiness change (from the event loop's thread)."""
    global _status_hook
    _status_hook = hook


def _status(state: str, text: str) -> None:
    if _status_hook is not None:
        _status_hook(state, text)


def ready(text: str = "") -> None:
    if not WINDOWS:
        sdnotify.ready(text or None)
    _status("ready", text)


def reloading() -> None:
    if not WINDOWS:
        sdnotify.reloading()
    _status("reloading", "")


def stopping(text: str = "") -> None:
    if not WINDOWS:
        sdnotify.stopping(text or None)
    _status("stopping", text)


class Requests:
    """Where stop and reload requests reach a running loop: from signals, or from any thread
    (`stop`, `reload`). `current` is the one of the running daemon, for the Windows
    service's stop. Each process role holds one for as long as it runs:
    `with Requests(loop, on_stop, on_reload): ...` installs it and removes it again."""

    current: Requests | None = None

    def __init__(self, loop: asyncio.AbstractEventLoop, on_stop: Callable[[str], None],
                 on_reload: Callable[[], None]) -> None:
        self.loop = loop
        self.on_stop = on_stop
        self.on_reload = on_reload
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Requests:
        self.install()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.remove()

    def install(self) -> None:
        Requests.current = self
        if not WINDOWS:
            self.loop.add_signal_handler(signal.SIGTERM, self.on_stop, "SIGTERM")
            self.loop.add_signal_handler(signal.SIGINT, self.on_stop, "SIGINT")
            self.loop.add_signal_handler(signal.SIGHUP, self.on_reload)
            return
        if threading.current_thread() is not threading.main_thread():
            return  # a service's thread: its stop comes through `stop`
        # The loop has no add_signal_handler on Windows: a plain handler hands the request to
        # the loop (which wakes at least every CONTROL_POLL_S of the queue manager).
        for name in ("SIGINT", "SIGBREAK"):
            signum = getattr(signal, name, None)
            if signum is not None:
                self._previous[signum] = signal.signal(signum, self._handler(name))

    def _handler(self, name: str) -> Callable[[int, Any], None]:
        def handle(_signum: int, _frame: Any) -> None:
            self.stop(name)
        return handle

    def stop(self, why: str) -> None:
        """Ask for a draining stop; safe from any thread."""
        self.loop.call_soon_threadsafe(self.on_stop, why)

    def reload(self) -> None:
        self.loop.call_soon_threadsafe(self.on_reload)

    def remove(self) -> None:
        if Requests.current is self:
            Requests.current = None
        if not WINDOWS:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self.loop.remove_signal_handler(sig)
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def user_name() -> str:
    """Who runs this process: POSIX, the password database's name for the uid (as sendmail
    takes it; $LOGNAME may say anything); Windows, the account name."""
    if not WINDOWS:
        import pwd

        try:
            return pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            pass
    return getpass.getuser()


def kill_self() -> None:
    """End this process at once, as an outside `kill -9` (POSIX) or `taskkill /F` (Windows:
    TerminateProcess, which os.kill does for any signal number but the console ones) would."""
    os.kill(os.getpid(), signal.SIGTERM if WINDOWS else signal.SIGKILL)
