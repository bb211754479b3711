"""Who may hold a session: server.max_sessions, server.max_sessions_per_client (SessionLimits),
and failed logins slowed down per client address (LoginGuard)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from relayd import clients
from relayd.config import ServerConfig

# The listener's log lines keep the listener's name, as before relayd.listener was split.
log = logging.getLogger("relayd.listener")

REPLY_TOO_MANY_SESSIONS = "421 4.7.0 Too many connections; try again later"
REPLY_TOO_MANY_FROM_YOU = "421 4.7.0 Too many connections from your address; try again later"
LIMIT_LOG_INTERVAL_S = 60.0  # at most one line a minute about refused connections, per listener
IDLE_GIVE_WAY_S = 10.0  # at max_sessions, a session with no command for this long gives way
AUTH_FAIL_DELAY_S = 1.0  # after a failed login, doubling per further failure from that address
AUTH_FAIL_DELAY_MAX_S = 8.0
AUTH_TRACKED_PEERS = 10_000


class Limited(Protocol):
    """What SessionLimits needs of a session (relayd.smtpd.RelaySMTP)."""

    client: str
    active_at: float

    def idle_for(self) -> float: ...

    def give_way(self) -> None: ...


S = TypeVar("S", bound=Limited)


class LoginGuard:
    """Slows down failed logins per client address (brute force) and counts them."""

    def __init__(self, on_failure: Callable[[], None]) -> None:
        self.failures: dict[str, tuple[int, float]] = {}
        self.on_failure = on_failure

    def delay(self, peer: str) -> float:
        count, _ = self.failures.get(peer, (0, 0.0))
        if not count:
            return 0.0
        return float(min(AUTH_FAIL_DELAY_MAX_S, AUTH_FAIL_DELAY_S * 2 ** (count - 1)))

    def failed(self, peer: str) -> None:
        count, _ = self.failures.get(peer, (0, 0.0))
        self.failures[peer] = (count + 1, time.monotonic())
        if len(self.failures) > AUTH_TRACKED_PEERS:  # bounded memory under a spray
            oldest = min(self.failures, key=lambda k: self.failures[k][1])
            del self.failures[oldest]
        self.on_failure()

    def succeeded(self, peer: str) -> None:
        self.failures.pop(peer, None)


class SessionLimits:
    """server.max_sessions and server.max_sessions_per_client for one listener's sessions,
    and a log of refusals that stays at one line a minute under a flood.

    The policy, after Postfix (its own networks are exempt from the per-client limits, and
    under stress its smtpd shortens the timeouts so idle sessions make room):
    - loopback clients are exempt from max_sessions_per_client: twenty idle connections from
      one local program must not lock Case Manager on the same host out for a session_timeout;
      max_sessions still counts them;
    - at max_sessions, a new connection is admitted if some session has given no command for
      IDLE_GIVE_WAY_S and has no transaction in progress: the one idle longest is closed with
      421 4.7.0 (a client that speaks again later simply connects again). Only with none such
      is the newcomer refused.
    Rejected: shortening every session's timeout at once, as Postfix's stress mode does (a
    timer sweep for what one comparison at admission does)."""

    def __init__(self, server: ServerConfig) -> None:
        self.max_sessions = server.max_sessions
        self.max_per_client = server.max_sessions_per_client
        self._logged_at = -LIMIT_LOG_INTERVAL_S
        self._unlogged = 0
        self._gave_way_at = -LIMIT_LOG_INTERVAL_S
        self._gave_way = 0

    def refusal(self, sessions: set[S], client: str) -> str | None:
        """The 421 for one more session from `client`, or None when it may have one (after
        closing the idlest session, when that is what makes room)."""
        if len(sessions) >= self.max_per_client and not clients.is_loopback(client) and sum(
                1 for s in sessions if s.client == client) >= self.max_per_client:
            return REPLY_TOO_MANY_FROM_YOU
        if len(sessions) >= self.max_sessions:
            idlest = min((s for s in sessions if s.idle_for() >= IDLE_GIVE_WAY_S),
                         key=lambda s: s.active_at, default=None)
            if idlest is None:
                return REPLY_TOO_MANY_SESSIONS
            idlest.give_way()
            sessions.discard(idlest)
            self._log_give_way(client)
        return None

    def _log_give_way(self, client: str) -> None:
        self._gave_way += 1
        now = time.monotonic()
        if now - self._gave_way_at < LIMIT_LOG_INTERVAL_S:
            return
        log.warning("server.max_sessions (%d) reached: closed %d idle session(s) to admit new "
                    "ones, the latest for %s", self.max_sessions, self._gave_way, client)
        self._gave_way_at, self._gave_way = now, 0

    def refused(self, client: str, reply: str) -> None:
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at < LIMIT_LOG_INTERVAL_S:
            return
        key = ("server.max_sessions" if reply == REPLY_TOO_MANY_SESSIONS
               else "server.max_sessions_per_client")
        log.warning("refused %d connection(s) over %s (%d), the latest from %s",
                    self._unlogged, key, self.max_sessions if key == "server.max_sessions"
                    else self.max_per_client, client)
        self._logged_at, self._unlogged = now, 0
