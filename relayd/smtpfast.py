"""The speed-ups of aiosmtpd's protocol that relayd keeps, apart from what the protocol does
(relayd.smtpd.RelaySMTP is a FastSMTP), each kept for what it was measured to return.

- **Tables made once per listener** (Tables): aiosmtpd's __init__ lists the protocol and the
  handler with dir() and inspect.getmembers() and reads handle_EHLO's signature, for every
  connection. Without the tables a message costs 3,533,762 instructions instead of 2,134,567
  (+66 %; `bench/cpu_split.py --workers 1 --callgrind --messages 1001`, one message a session,
  2026-12-07); a new protocol 200-370 us instead of 40-140 us (timeit, noisy).
- **EHLO in one write** (FastSMTP.smtp_EHLO): aiosmtpd writes each line of its EHLO reply on
  its own. 9.3 instead of 16.3 write() calls a session, and 1,110-1,300 instead of
  1,210-1,520 us of relayd's CPU a session, lower in 3 of 3 pairs (`bench/ehlo_sessions.py
  --strace`, and without it, smtplib sessions of EHLO, MAIL, RCPT, DATA, QUIT). The bench's
  smtp-source sends HELO and does not see it; most clients send EHLO.

Removed (issue 24), for what they cost a reader against what they returned:
- aiosmtpd's `sanitized_log` replaced process-wide at import by one that asks the logger
  first: +2.9 % instructions a message without it (2,134,567 -> 2,195,795), for a patch of a
  library's module global that changed aiosmtpd for every server in the process.
- One session timer with its deadline moved on, over three aiosmtpd internals
  (_reset_timeout, _timeout_handle, _timeout_duration): +2.1 % without it (2,178,656), and
  the timer logic of aiosmtpd's own `_reset_timeout` is four lines.

aiosmtpd private names used here (pyproject pins aiosmtpd>=1.4.6,<1.5; each is read or set
as aiosmtpd 1.4.6's SMTP.__init__ and its command loop use it):

| name | use |
|---|---|
| `SMTP._smtp_methods` | read from the first protocol, set on later ones (Tables) |
| `SMTP._auth_methods` | the same |
| `SMTP._handle_hooks` | the same |
| `SMTP._ehlo_hook_ver` | the same |
| `SMTP.__init__` lists with dir() | FastSMTP.__dir__ and the stand-in handler list nothing |
"""

from __future__ import annotations

from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, syntax


class _Unlisted:
    """Stands in for the handler while aiosmtpd's __init__ runs: nothing in it to list."""

    def __dir__(self) -> list[str]:
        return []


_UNLISTED = _Unlisted()


class Tables:
    """What aiosmtpd's __init__ works out again for every new connection, made once per
    listener: the command methods and AUTH mechanisms (from dir() and inspect.getmembers() on
    the protocol and the handler), the handler's hooks, and which of handle_EHLO's two forms
    the handler has (from inspect.signature). None of it depends on the connection, and it
    was most of the cost of a new protocol (figures above).

    The listener's first protocol is built by aiosmtpd's own code, and its tables are kept.
    Each later one runs aiosmtpd's __init__ with nothing to list (FastSMTP.__dir__ and the
    stand-in handler) and then gets the kept tables: its own methods bound to itself, the
    handler's the same bound methods for all (aiosmtpd only reads _handle_hooks).
    """

    def __init__(self, first: SMTP) -> None:
        self.commands = [(name, method.__func__)
                         for name, method in first._smtp_methods.items()]
        # A builtin mechanism is a method of the protocol, to bind to each one; the others
        # are the handler's, already bound: (name, the first's entry, the function to bind).
        self.auth: list[tuple[str, Any, Any]] = []
        for name, impl in first._auth_methods.items():
            method: Any = impl.method
            self.auth.append((name, impl, method.__func__ if impl.is_builtin else None))
        self.hooks = first._handle_hooks
        self.ehlo = first._ehlo_hook_ver

    def apply(self, protocol: SMTP) -> None:
        protocol._smtp_methods = {name: func.__get__(protocol)
                                  for name, func in self.commands}
        protocol._auth_methods = {  # entries are NamedTuples: _replace is public there
            name: entry if func is None else entry._replace(method=func.__get__(protocol))
            for name, entry, func in self.auth}
        protocol._handle_hooks = self.hooks
        protocol._ehlo_hook_ver = self.ehlo


class FastSMTP(SMTP):
    """aiosmtpd's SMTP with the tables of the listener's first protocol (Tables) and EHLO
    written in one piece."""

    def __init__(self, handler: Any, *, tables: Tables | None = None, **kwargs: Any) -> None:
        if tables is None:
            super().__init__(handler, **kwargs)
        else:
            self._unlisted = True
            super().__init__(_UNLISTED, **kwargs)
            self._unlisted = False
            self.event_handler = handler
            tables.apply(self)

    _unlisted = False  # True while aiosmtpd's __init__ runs with the tables given (Tables)

    def __dir__(self) -> list[str]:
        return [] if self._unlisted else list(super().__dir__())

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        """aiosmtpd's, with its reply written in one piece. aiosmtpd pushes each line of it on
        its own: a system call, a TCP segment and a wake-up of the client a line, eight of each
        for one EHLO here, where Postfix writes the reply at once. Its lines are gathered by
        a stand-in for push while it runs (an override of push would cost every reply of
        every session a coroutine more)."""
        lines: list[bytes] = []

        async def gather(status: AnyStr) -> None:  # encoded as aiosmtpd's push does
            lines.append(status if isinstance(status, bytes) else
                         status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii"))

        self.push = gather  # type: ignore[method-assign]
        try:
            await super().smtp_EHLO(hostname)
        finally:
            del self.push
        if lines:
            await self.push(b"\r\n".join(lines))
