"""Token providers, made here (make_token_provider) and found here: the one place the status
page, [notify], the metrics and `relayd auth status` learn which credentials need a person,
and where idle sign-ins are kept alive, without an upstream client.

Rules:
- Every token provider registers itself when built (relayd.auth.tokens.register_live): the ones
  the delivery agents use hold what only memory knows (an app token's expiry, the last refusal
  of a Google service account), so a route's health is read from its live provider when it has
  one.
- A route that no agent has used yet is read through a provider built here for reading only,
  as `relayd auth status` does: the token store's small files and the credential's expiry, no
  network and no upstream client. It is kept for the next read while the route is unchanged
  (it caches the decrypted summaries), and dropped when the route changes or goes.
Rejected: asking each route's delivery agent (QueueManager.agent_for) for its upstream's
token_health(), which built the route's upstream client (its HTTP pool, its exchangelib
account) just to answer a status read, for routes that had sent nothing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

import relayd.auth.health as health_rules
from relayd.auth.google import GoogleTokenProvider
from relayd.auth.oauth import (
    MsalTokenProvider,
    app_scopes,
    delegated_scopes,
    is_google_oauth,
    is_microsoft_oauth,
)
from relayd.auth.tokens import TokenHealth, live_providers
from relayd.config import Config, RouteConfig

log = logging.getLogger(__name__)

Reader = MsalTokenProvider | GoogleTokenProvider


def oauth_scopes(route: RouteConfig) -> list[str] | None:
    """The scopes a reader of the route's tokens is built with; None: the route has no OAuth
    credential to report."""
    if is_microsoft_oauth(route):
        return delegated_scopes(route) if route.delegated else app_scopes(route)
    if is_google_oauth(route):
        return []
    return None


def make_token_provider(route: RouteConfig, config: Config, scopes: Sequence[str]) -> Reader:
    """The token provider for an OAuth route: Google for provider = "google", MSAL otherwise."""
    if is_google_oauth(route):
        return GoogleTokenProvider(route, config, scopes)
    return MsalTokenProvider(route, config, scopes)


def _reader(route: RouteConfig, config: Config) -> Reader | None:
    scopes = oauth_scopes(route)
    return None if scopes is None else make_token_provider(route, config, scopes)


class TokenRegistry:
    """Each OAuth route's token health (see the module docstring). Safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._readers: dict[str, Reader] = {}  # route name -> a provider built for reading

    def health(self, config: Config) -> list[TokenHealth]:
        out: list[TokenHealth] = []
        for route in list(config.routes.values()):
            out.extend(self.health_of(config, route))
        return out

    def health_of(self, config: Config, route: RouteConfig) -> list[TokenHealth]:
        """One route's credentials; [] for a route without OAuth."""
        try:
            provider = self._provider(route, config)
            return provider.health() if provider is not None else []
        except Exception:  # noqa: BLE001 - one route's bug must not stop the others
            log.exception("token health of route %s could not be read", route.name)
            return []

    async def keep_fresh(self, config: Config) -> None:
        """Refresh idle delegated sign-ins of every route (relayd.auth.health.refresh_idle),
        through the route's live provider, or one built here when no agent has used the route
        yet. Never raises: one route's failure is logged and the others go on."""
        for route in list(config.routes.values()):
            try:
                provider = await asyncio.to_thread(self._provider, route, config)
                if provider is not None:
                    await provider.refresh_idle()
            except Exception as e:  # noqa: BLE001 - the next round tries again
                log.warning("route %s: background token refresh failed: %s", route.name, e)

    def _provider(self, route: RouteConfig, config: Config) -> Reader | None:
        root = config.auth.path
        with self._lock:
            reader = self._readers.get(route.name)
            for provider in live_providers():
                if provider is not reader and provider.route == route \
                        and provider.store.root == root and isinstance(provider, Reader):
                    return provider
            if reader is not None and reader.route == route and reader.store.root == root:
                return reader
            if reader is not None:
                reader.close()
                del self._readers[route.name]
            reader = _reader(route, config)
            if reader is not None:
                self._readers[route.name] = reader
            return reader

    def close(self) -> None:
        with self._lock:
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()


REGISTRY = TokenRegistry()  # the process's: providers register in relayd.auth.tokens


def token_health(config: Config) -> list[TokenHealth]:
    """Every OAuth route's token health, idle routes too (no upstream client built)."""
    return REGISTRY.health(config)


async def keep_tokens_fresh(config: Config) -> None:
    """Keep every route's idle delegated sign-ins alive (TokenRegistry.keep_fresh)."""
    await REGISTRY.keep_fresh(config)


def route_token_health(config: Config, route: RouteConfig) -> list[TokenHealth]:
    """One route's credentials, without building its upstream (see the module docstring)."""
    return REGISTRY.health_of(config, route)


def _when(ts: float | None) -> str:
    if not ts:
        return "unknown"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _token_providers(config: Config) -> list[tuple[RouteConfig, bool, Reader]]:
    """A token provider per OAuth route, built only to read its health (no network)."""
    out = []
    for route in config.routes.values():
        provider = _reader(route, config)
        if provider is not None:
            out.append((route, route.delegated, provider))
    return out


def status(config: Config, out: TextIO) -> int:
    """`relayd auth status`: each route's and user's token: account, expiry, last refresh,
    whether it needs a new sign-in (and the command for it), the app credential's expiry;
    never a token. Exit 0 when every token is usable as far as relayd knows, 1 otherwise."""
    problems = 0
    providers = _token_providers(config)
    if not providers:
        out.write("no OAuth routes configured\n")
        return 0
    now = time.time()
    for route, delegated, provider in providers:
        try:
            healths = provider.health()
        finally:
            provider.close()
        cred = health_rules.credential_expiry(route)
        if cred is not None:
            left = (cred - now) / 86400
            kind = "certificate" if route.oauth and route.oauth.certificate_file else "secret"
            out.write(f"{route.name}: app credential (client {kind}) expires "
                      f"{_when(cred)}" + (" - EXPIRED" if left < 0 else f" (in {left:.0f} days)")
                      + "\n")
            if left < 0:
                problems += 1
        if delegated and not healths:
            out.write(f"{route.name}: nobody signed in (relayd auth login {route.name} "
                      "--user ADDR)\n")
            continue
        if not healths:
            out.write(f"{route.name}: service account (domain-wide delegation); tokens kept in "
                      "daemon memory\n")
            continue
        for h in healths:
            if not delegated and is_microsoft_oauth(route):
                line = f"{route.name}: app-only (client credentials); token kept in daemon memory"
                if h.expires_at:
                    line += f"; last token valid until {_when(h.expires_at)}"
            else:
                line = (f"{route.name}: {h.account or 'refresh_token_file'}: access token valid "
                        f"until {_when(h.expires_at)}")
                if delegated:
                    line += "; refresh token " + ("missing" if "no refresh token" in h.problem
                                                  else "stored")
            if h.last_refreshed:
                line += f"; last refreshed {_when(h.last_refreshed)}"
            if h.needs_signin:
                problems += 1
                line += f"; NEEDS SIGN-IN: {h.problem}; run: {h.fix}"
            elif h.problem:
                problems += 1
                line += f"; last error: {h.problem}"
            out.write(line + "\n")
    return 1 if problems else 0
