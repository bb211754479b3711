"""Envelope sender -> route: an exact address beats *@domain, which beats *."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from relayd.config import RouteConfig, ascii_lower


@dataclass(frozen=True)
class Match:
    route: RouteConfig
    pattern: str


def normalize(address: str) -> str:
    """ASCII lower-case for matching. Local parts are case-sensitive in theory, never in
    practice; a non-ASCII address must match a pattern exactly (no Unicode case folding)."""
    return ascii_lower(address.strip())


def matches_any(patterns: tuple[str, ...], sender: str) -> bool:
    """Whether `sender` matches one of the patterns (exact, *@domain or *)."""
    address = normalize(sender)
    domain = address.rpartition("@")[2]
    return "*" in patterns or address in patterns or f"*@{domain}" in patterns


MATCH_CACHE_SIZE = 4096  # distinct senders remembered (a small firm has a handful)


class Router:
    """Looks up the route for an envelope sender. Built once per config; its answers do not
    change, so each sender's is kept (a message is looked up at MAIL FROM, when it is queued
    and after each attempt)."""

    def __init__(self, routes: Mapping[str, RouteConfig]) -> None:
        self._cache: dict[str, Match | None] = {}
        self._exact: dict[str, RouteConfig] = {}
        self._domain: dict[str, RouteConfig] = {}
        self._default: RouteConfig | None = None
        for route in routes.values():
            for pattern in route.senders:
                if pattern == "*":
                    self._default = route
                elif pattern.startswith("*@"):
                    self._domain[pattern[2:]] = route
                else:
                    self._exact[pattern] = route

    def match(self, sender: str) -> Match | None:
        try:
            return self._cache[sender]
        except KeyError:
            pass
        found = self._match(sender)
        if len(self._cache) >= MATCH_CACHE_SIZE:
            self._cache.clear()  # a spray of senders: start over rather than grow
        self._cache[sender] = found
        return found

    def _match(self, sender: str) -> Match | None:
        address = normalize(sender)
        if not address or "@" not in address:
            return None
        route = self._exact.get(address)
        if route is not None:
            return Match(route, address)
        domain = address.rpartition("@")[2]
        route = self._domain.get(domain)
        if route is not None:
            return Match(route, f"*@{domain}")
        if self._default is not None:
            return Match(self._default, "*")
        return None

    def lookup(self, sender: str) -> RouteConfig | None:
        m = self.match(sender)
        return m.route if m else None


def recipient_allowed(route: RouteConfig, recipient: str) -> bool:
    """Whether `route.recipients` lets `recipient` through (an empty list allows anyone)."""
    return not route.recipients or matches_any(route.recipients, recipient)
