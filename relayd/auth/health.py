"""Token health: which refusals mean "this user must sign in again", when an app credential
lapses, and when an idle delegated token is due for a background refresh.

Policy: a refresh token dies after 90 days unused (earlier under sign-in-frequency policies, on a
password reset or a revocation), so the daemon refreshes each delegated token that has been idle
for REFRESH_IDLE_S (a week, plus a per-account jitter so a hundred users who signed in the same
morning are not refreshed in the same second). A refresh that fails with one of
NEEDS_SIGNIN_MARKERS marks the account "needs sign-in" with the command that fixes it; the mail
waiting for it is deferred (AuthenticationError is transient), never bounced.
Rejected: refreshing on a timer shorter than a week (it buys nothing against a 90-day lapse and
multiplies sign-in log entries) and refreshing only on use (the lapse is found when mail waits).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from cryptography import x509

from relayd.auth.tokens import TokenHealth
from relayd.config import RouteConfig
from relayd.errors import AuthenticationError

log = logging.getLogger(__name__)

REFRESH_IDLE_S = 7 * 86400.0  # refresh a delegated token idle this long (at most weekly)
REFRESH_JITTER = 0.15  # ... plus up to this fraction of REFRESH_IDLE_S, fixed per account
IDLE_RETRY_S = 3600.0  # a failed idle refresh (a passing reason) is tried again after this
# In a refusal's text: the refresh token is gone or the user must interact (MFA, consent).
NEEDS_SIGNIN_MARKERS = ("invalid_grant", "interaction_required", "AADSTS700082",
                        "AADSTS50173", "AADSTS70043", "AADSTS50076", "has not signed in",
                        "stored sign-in is not for")

_cert_cache: dict[Path, tuple[int, float | None]] = {}  # path -> (mtime_ns, notAfter)


def needs_signin(problem: str | None) -> bool:
    return bool(problem) and any(m.lower() in str(problem).lower() for m in NEEDS_SIGNIN_MARKERS)


def fix_command(route: str, account: str) -> str:
    return f"relayd auth login {route} --user {account}"


def refresh_due(account: str, last_refreshed: float, now: float,
                idle_s: float | None = None) -> bool:
    """Whether a token last refreshed at `last_refreshed` is due for an idle refresh."""
    base = REFRESH_IDLE_S if idle_s is None else idle_s
    frac = int.from_bytes(hashlib.sha256(account.lower().encode()).digest()[:4], "big") / 2**32
    return now - last_refreshed >= base * (1 + REFRESH_JITTER * frac)


class Refreshable(Protocol):
    """What an idle refresh needs of a delegated token provider (MSAL, Google)."""

    def health(self) -> Sequence[TokenHealth]: ...
    def invalidate(self, account: str) -> None: ...
    def acquire(self, account: str) -> object: ...


async def refresh_idle(provider: Refreshable, route: str, tried: dict[str, float],
                       now: float | None = None) -> None:
    """Refresh each signed-in account whose token is idle past REFRESH_IDLE_S (jittered), so
    its refresh token never lapses unused. One that needs a new sign-in is left alone; one that
    failed for a passing reason is tried again after IDLE_RETRY_S (`tried`: account -> last
    attempt, kept by the provider)."""
    now = time.time() if now is None else now
    for h in await asyncio.to_thread(provider.health):
        if h.needs_signin or h.last_refreshed is None:
            continue
        if not refresh_due(h.account, h.last_refreshed, now):
            continue
        if now - tried.get(h.account, 0.0) < IDLE_RETRY_S:
            continue
        tried[h.account] = now
        provider.invalidate(h.account)
        try:
            await asyncio.to_thread(provider.acquire, h.account)
        except AuthenticationError:
            continue  # recorded by acquire(): health() and `auth status` show it
        log.info("route %s: refreshed the idle token of %s", route, h.account)


def certificate_expiry(path: Path) -> float | None:
    """notAfter of the (first) certificate in a PEM file, epoch seconds; None if unreadable.
    Cached by mtime: status pages ask often."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return None
    held = _cert_cache.get(path)
    if held and held[0] == mtime:
        return held[1]
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
        when: float | None = min(c.not_valid_after_utc.timestamp() for c in certs)
    except (OSError, ValueError):
        when = None
    _cert_cache[path] = (mtime, when)
    return when


def credential_expiry(route: RouteConfig) -> float | None:
    """When the route's app credential lapses: the client certificate's notAfter, or
    `client_secret_expires` (the start of that day, UTC), whichever comes first."""
    found: list[float] = []
    oauth = route.oauth
    if oauth is None:
        return None
    if oauth.certificate_file is not None:
        cert = certificate_expiry(oauth.certificate_file)
        if cert is not None:
            found.append(cert)
    if oauth.client_secret_expires is not None:
        day = oauth.client_secret_expires
        found.append(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())
    return min(found) if found else None
