"""Credentials beside delivery: password sources, OAuth token providers, encrypted token caches.
Token providers are made and found in relayd.auth.registry."""

from __future__ import annotations

from relayd.auth.tokens import AccessToken, TokenHealth, TokenProvider

__all__ = ["AccessToken", "TokenHealth", "TokenProvider"]
