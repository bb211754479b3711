"""Envelope sender -> route: an exact address beats *@domain, which beats * (the rule is
relayd.patterns.best_pattern, which relayd.config uses too, so neither imports the other)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from relayd.config import RouteConfig
from relayd.patterns import allows, best_pattern
from relayd.patterns import matches_any as matches_any
from relayd.patterns import normalize as normalize


@dataclass(frozen=True)
class Match:
    route: RouteConfig
    pattern: str


MATCH_CACHE_SIZE = 4096  # distinct senders remembered (a small firm has a handful)


class Router:
    """Looks up the route for an envelope sender. Built once per config; its answers do not
    change, so each sender's is kept (a message is looked up at MAIL FROM, when it is queued
    and after each attempt)."""

    def __init__(self, routes: Mapping[str, RouteConfig]) -> None:
        self._cache: dict[str, Match | None] = {}
        # each sender pattern's route (relayd.patterns.best_pattern picks the pattern)
        self._routes = {pattern: route for route in routes.values() for pattern in route.senders}

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
        pattern = best_pattern(sender, self._routes)
        return None if pattern is None else Match(self._routes[pattern], pattern)

    def lookup(self, sender: str) -> RouteConfig | None:
        m = self.match(sender)
        return m.route if m else None


def recipient_allowed(route: RouteConfig, recipient: str) -> bool:
    """Whether `route.recipients` lets `recipient` through (an empty list allows anyone)."""
    return allows(route.recipients, recipient)
