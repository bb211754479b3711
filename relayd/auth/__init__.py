"""Credentials beside delivery: password sources, OAuth token providers, encrypted token caches."""

from __future__ import annotations

from collections.abc import Sequence

from relayd.auth.tokens import AccessToken, TokenHealth, TokenProvider
from relayd.config import Config, RouteConfig

__all__ = ["AccessToken", "TokenHealth", "TokenProvider", "make_token_provider"]


def make_token_provider(route: RouteConfig, config: Config, scopes: Sequence[str]) -> TokenProvider:
    """The token provider for an OAuth route: Google for provider = "google", MSAL otherwise."""
    if route.oauth is not None and route.oauth.provider == "google":
        from relayd.auth.google import GoogleTokenProvider

        return GoogleTokenProvider(route, config, scopes)
    from relayd.auth.oauth import MsalTokenProvider

    return MsalTokenProvider(route, config, scopes)
