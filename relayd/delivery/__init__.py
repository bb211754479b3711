"""The delivery interface every upstream implements, and the factory that picks one per route.

An `Upstream` is built once per route (and rebuilt on reload). The route's delivery agent
(`relayd.delivery.agent`) opens up to `max_connections` sessions from it; each session delivers
one message at a time, so a session may keep a connection open between messages. `deliver`
returns one `RecipientResult` per recipient, each with the upstream's `Reply`, or raises
`TransientDeliveryError` / `PermanentDeliveryError` when the whole attempt failed.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from relayd.auth import TokenHealth
from relayd.config import Config, RouteConfig
from relayd.reply import Reply

SENT_CLOCK_SKEW_S = 300.0  # find_sent: a copy sent this long before `since` still counts


class Status(enum.Enum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass(frozen=True)
class RecipientResult:
    status: Status
    reply: Reply

    @classmethod
    def smtp(cls, status: Status, code: int | None, text: str) -> RecipientResult:
        return cls(status, Reply.smtp(code, text))


@dataclass(frozen=True)
class OutboundMessage:
    """What a session delivers: the envelope still pending and the message bytes as received."""

    queue_id: str
    sender: str  # "" for a bounce
    recipients: Sequence[str]
    data: bytes
    mail_options: Sequence[str] = field(default_factory=tuple)  # e.g. BODY=8BITMIME, SMTPUTF8


class Session(abc.ABC):
    @abc.abstractmethod
    async def deliver(self, message: OutboundMessage) -> dict[str, RecipientResult]:
        """Deliver one message; raise Transient/PermanentDeliveryError if nothing got through."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the session holds (a connection). Never raises."""


class Upstream(abc.ABC):
    def __init__(self, route: RouteConfig, config: Config) -> None:
        self.route = route
        self.config = config

    @abc.abstractmethod
    def session(self) -> Session:
        """A new session; cheap, connects lazily."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release shared resources (HTTP clients, thread pools, token providers)."""

    async def find_sent(self, message: OutboundMessage, since: float) -> bool | None:
        """`dedupe`: whether the sending mailbox's Sent Items holds this message (by its
        Message-ID, sent after `since`). None when this upstream cannot tell (no copy kept, no
        permission to look): the message is then sent again, at least once."""
        return None

    def token_expiries(self) -> dict[str, float]:
        """Account -> expiry (epoch seconds) of the OAuth tokens this route holds."""
        return {}

    def token_health(self) -> list[TokenHealth]:
        """Each credential this route uses and what needs a person (relayd.auth.TokenHealth);
        [] for routes without OAuth. Must be cheap (no network)."""
        return []

    async def keep_fresh(self) -> None:  # noqa: B027 - optional hook
        """Refresh delegated OAuth tokens idle for a week (jittered), so none lapses unused.
        The service calls it now and then (every few minutes is fine: it only looks at
        timestamps unless a token is due). Never raises; failures show in token_health()."""


def all_results(recipients: Sequence[str], result: RecipientResult) -> dict[str, RecipientResult]:
    return {r: result for r in recipients}


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
