"""The shapes every credential module shares: an access token, a credential's health, and
what a token provider offers (the package's __init__ re-exports them). Kept apart from the
providers so that relayd.auth.oauth, relayd.auth.google and relayd.auth.health import these and
not the package that builds the providers (no import circle)."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # relayd.config reads password hashes from relayd.auth.passwords
    from relayd.config import OAuthSettings, RouteConfig


@dataclass(frozen=True)
class AccessToken:
    """An access token and when to stop using it (`renew_at`, before its real `expires_at`)."""

    token: str
    renew_at: float
    expires_at: float

    def __repr__(self) -> str:
        return f"AccessToken('***', renew_at={self.renew_at:.0f})"


@dataclass(frozen=True)
class TokenHealth:
    """What an admin must know about one route's credential for one account: shown by
    `relayd auth status` and the status page, and what [notify] warns about."""

    route: str
    account: str  # the user or mailbox; "" for an app-only credential
    expires_at: float | None = None  # the current access token's expiry (epoch seconds)
    last_refreshed: float | None = None  # when a token was last obtained (epoch seconds)
    needs_signin: bool = False  # the user must sign in again (invalid_grant, revoked, lapsed)
    problem: str = ""  # why, in the provider's words (e.g. AADSTS70043 ...)
    fix: str = ""  # the command or URL that fixes it
    credential_expires_at: float | None = None  # client certificate / client_secret_expires


class TokenProvider(Protocol):
    """Gives OAuth access tokens for one route.

    `account` is the mailbox or user the token must act for (delegated flows keep one token cache
    per user; app-only flows ignore it). Implementations cache tokens and renew them before they
    expire; a failure raises relayd.errors.AuthenticationError (transient: mail is deferred).
    """

    async def token(self, account: str) -> str: ...

    def invalidate(self, account: str) -> None:
        """Forget a token the upstream refused (401/535), so the next call fetches a new one."""

    def expiries(self) -> dict[str, float]:
        """When each account's current token expires (epoch seconds), for the metrics."""

    def health(self) -> list[TokenHealth]:
        """Each credential this provider holds (app or signed-in user) and what needs a
        person; cheap (memory and the token store's small files, no network)."""

    async def refresh_idle(self, now: float | None = None) -> None:
        """Refresh delegated tokens idle for relayd.auth.health.REFRESH_IDLE_S (jittered), so
        no refresh token lapses unused; failures are recorded for health(), never raised."""

    def close(self) -> None:
        """Release the provider's HTTP session."""


# Every token provider built in this process, while it lives (relayd.auth.registry reads them).
_live: weakref.WeakSet[Any] = weakref.WeakSet()
_live_lock = threading.Lock()


def register_live(provider: object) -> None:
    """Called by each provider's constructor (MSAL, Google)."""
    with _live_lock:
        _live.add(provider)


def live_providers() -> list[Any]:
    """The providers alive now, in no particular order."""
    with _live_lock:
        return list(_live)


def oauth_of(route: RouteConfig) -> OAuthSettings:
    """The OAuth settings of a route a token provider is built for (a route without them here is
    a caller's mistake: ValueError)."""
    if route.oauth is None:
        raise ValueError(f"route {route.name} does not sign in with OAuth")
    return route.oauth
