"""The delivery interface every upstream implements (`Upstream`, `Session`) and what passes
through it (`OutboundMessage`, `RecipientResult`, `Status`, `SpooledBody`). relayd.delivery
re-exports these and holds the factory (`make_upstream`), which imports the upstreams; the
upstreams import this module, not the package, so no import goes round in a circle.
"""

from __future__ import annotations

import abc
import asyncio
import enum
from collections.abc import AsyncIterator, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relayd.config import Config, RouteConfig
from relayd.delivery.mime import sending_mailbox
from relayd.reply import Reply

SENT_CLOCK_SKEW_S = 300.0  # find_sent: a copy sent this long before `since` still counts
CHUNK_BYTES = 1024 * 1024  # a spooled message is read and sent this much at a time
# Upstreams that send a large message from its spool file in chunks; EWS and Graph need it
# whole (as MIME in one request), and their own size limits keep it small.
STREAMING_UPSTREAMS = frozenset({"smtp", "outbox"})


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
class SpooledBody:
    """A large message's bytes, left in its spool file for an upstream that sends them in
    chunks (smtp, outbox), so that memory does not grow with message size."""

    path: Path
    offset: int
    size: int

    def read_chunks(self) -> Generator[bytes, None, None]:
        """The bytes, CHUNK_BYTES at a time, read from the file (blocking: on a thread; OSError
        if the file is gone)."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            while chunk := f.read(CHUNK_BYTES):
                yield chunk

    async def chunks(self) -> AsyncIterator[bytes]:
        """read_chunks for the event loop: each chunk read on a thread."""
        reader = self.read_chunks()
        try:
            while (chunk := await asyncio.to_thread(next, reader, b"")):
                yield chunk
        finally:
            reader.close()


@dataclass(frozen=True)
class OutboundMessage:
    """What a session delivers: the envelope still pending and the message bytes as received:
    in `data`, or for a large message sent through an upstream that streams, in `spooled`
    (`data` is then empty)."""

    queue_id: str
    sender: str  # "" for a bounce
    recipients: Sequence[str]
    data: bytes
    mail_options: Sequence[str] = field(default_factory=tuple)  # e.g. BODY=8BITMIME, SMTPUTF8
    spooled: SpooledBody | None = None

    @property
    def size(self) -> int:
        return self.spooled.size if self.spooled is not None else len(self.data)


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

    def lane(self, sender: str, recipients: Sequence[str]) -> tuple[str, int] | None:
        """What this upstream lets run at once across a route's messages, when it is less than
        the route's sessions: the message's lane (a key) and how many attempts of that lane
        may be under way together, as Graph allows 4 requests per mailbox. The queue manager
        starts no attempt in a full lane, so one lane's backlog cannot take every session
        while the others' mail waits. None (the default): only `max_connections` counts."""
        return None

    def sending_mailbox(self, sender: str, recipients: Sequence[str]) -> str | None:
        """The mailbox a message is sent as or from, whose provider limits it counts against
        (relayd.qmgr.pacing): the route's fixed mailbox, else the sender's own. None when the
        envelope names none (a bounce to several recipients)."""
        return sending_mailbox(self.route, sender, recipients)

    def token_expiries(self) -> dict[str, float]:
        """Account -> expiry (epoch seconds) of the OAuth tokens this route holds."""
        return {}


def all_results(recipients: Sequence[str], result: RecipientResult) -> dict[str, RecipientResult]:
    return {r: result for r in recipients}
