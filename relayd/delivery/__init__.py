"""The delivery interface every upstream implements, and the factory that picks one per route.

An `Upstream` is built once per route (and rebuilt on reload). The route's delivery agent
(`relayd.delivery.agent`) opens up to `max_connections` sessions from it; each session delivers
one message at a time, so a session may keep a connection open between messages. `deliver`
returns one `RecipientResult` per recipient, each with the upstream's `Reply`, or raises
`TransientDeliveryError` / `PermanentDeliveryError` when the whole attempt failed.
"""

from __future__ import annotations

from relayd.config import Config, RouteConfig
from relayd.delivery.base import (
    CHUNK_BYTES,
    SENT_CLOCK_SKEW_S,
    STREAMING_UPSTREAMS,
    OutboundMessage,
    RecipientResult,
    Session,
    SpooledBody,
    Status,
    Upstream,
    all_results,
)

__all__ = [
    "CHUNK_BYTES",
    "OutboundMessage",
    "RecipientResult",
    "SENT_CLOCK_SKEW_S",
    "STREAMING_UPSTREAMS",
    "Session",
    "SpooledBody",
    "Status",
    "Upstream",
    "all_results",
    "make_upstream",
]


def make_upstream(route: RouteConfig, config: Config) -> Upstream:
    """The Upstream for a route's `upstream` key. Imports lazily: ews pulls in exchangelib."""
    if route.upstream == "smtp":
        from relayd.delivery.smtp import SmtpUpstream

        return SmtpUpstream(route, config)
    if route.upstream == "outbox":
        from relayd.delivery.outbox import OutboxUpstream

        return OutboxUpstream(route, config)
    if route.upstream == "ews":
        from relayd.delivery.ews import EwsUpstream

        return EwsUpstream(route, config)
    if route.upstream == "graph":
        from relayd.delivery.graph import GraphUpstream

        return GraphUpstream(route, config)
    raise ValueError(f"unknown upstream {route.upstream!r}")
