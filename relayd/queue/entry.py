"""A queued message as the queue manager holds it: its envelope and per-recipient delivery
state (`Entry`), the queue id (`new_id`), and the envelope strings shared between entries.
The bytes stay on disk (relayd.queue.spool)."""

from __future__ import annotations

import itertools
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1
ID_RE = re.compile(r"^[0-9A-Z]{10,20}$")
INTERN_MAX = 65536  # distinct envelope strings shared between entries (see intern)

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"


_ID_TAIL_SPACE = 36 ** 5
_id_tail = itertools.count(secrets.randbelow(_ID_TAIL_SPACE))  # random start per process


def new_id() -> str:
    """Sortable by arrival (microseconds, base 36), then 5 characters that differ between
    messages of one microsecond: a counter from a random start per process (listener workers
    are separate processes), not a random read per message, which costs a system call."""
    micros = int(time.time() * 1_000_000)
    tail = next(_id_tail) % _ID_TAIL_SPACE
    return _base36(micros).rjust(11, "0") + _base36(tail).rjust(5, "0")


def _base36(n: int) -> str:
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out or "0"


@dataclass(slots=True)
class RecipientState:
    status: str = PENDING
    code: int | None = None
    text: str = ""


@dataclass(slots=True)
class Entry:
    """One queued message: its envelope and delivery state. The bytes stay on disk.

    The queue manager holds one per queued message (100,000 with an upstream down), so it is
    kept small: slots, envelope strings shared between entries (`intern`), and no list of
    its own for the bounce recipients of a message that is not a bounce."""

    id: str
    sender: str
    recipients: list[str]
    received: float
    mail_options: Sequence[str] = ()  # a list when there are any (one tuple shared if none)
    client: str = ""
    route: str | None = None  # pinned route (bounces go back through the original's route)
    message_id: str = ""  # the Message-ID header, for the journal and dedupe
    login: str = ""  # the listener login it came with, if any
    bounce_for: str | None = None  # a bounce: the queue id of the message it reports
    bounce_rcpts: Sequence[str] = ()  # and the recipients it reports
    size: int = 0
    data_offset: int = 0
    attempts: int = 0
    backoff: int = 0  # failed tries since the last retry request
    started: int = 0  # dedupe: the attempt that was sent and not yet reported (0: none)
    doubt: str = ""  # dedupe: why that attempt may have gone out (relayd.delivery.doubt)
    doubt_at: float = 0.0  # and when it ended (epoch seconds)
    next_attempt: float = 0.0
    last_error: str = ""
    rcpt: dict[str, RecipientState] = field(default_factory=dict)
    has_state: bool = False  # a state/ file exists for it

    @property
    def is_bounce(self) -> bool:
        return self.sender == ""

    @property
    def file_size(self) -> int:
        """Its msg/ file's: the envelope line, then the message."""
        return self.data_offset + self.size

    def pending(self) -> list[str]:
        return [r for r in self.recipients if self.rcpt[r].status == PENDING]

    def envelope_json(self) -> dict[str, Any]:
        env = {"v": FORMAT_VERSION, "id": self.id, "sender": self.sender,
               "recipients": self.recipients, "received": self.received,
               "mail_options": self.mail_options, "client": self.client, "route": self.route}
        if self.bounce_for is not None:
            env["bounce_for"] = {"id": self.bounce_for, "recipients": self.bounce_rcpts}
        if self.message_id:
            env["message_id"] = self.message_id
        if self.login:
            env["login"] = self.login
        return env

    def state_json(self) -> dict[str, Any]:
        state = {"attempts": self.attempts, "backoff": self.backoff, "started": self.started,
                 "next_attempt": self.next_attempt, "last_error": self.last_error,
                 "rcpt": {r: {"status": s.status, "code": s.code, "text": s.text}
                          for r, s in self.rcpt.items()}}
        if self.doubt:
            state["doubt"] = {"why": self.doubt, "at": self.doubt_at}
        return state

    def summary(self) -> dict[str, Any]:
        """What `relayd queue list/show` print."""
        return {**self.envelope_json(), "size": self.size, **self.state_json()}



_interned: dict[str, str] = {}


def intern(value: Any) -> str:
    """A string from an envelope, shared with every other envelope that has the same one
    (senders, recipients, clients and routes repeat: 100,000 queued for one address are one
    string, not 100,000). Bounded, so a flood of distinct addresses cannot grow it forever."""
    s = as_str(value)
    shared = _interned.get(s)
    if shared is not None:
        return shared
    if len(_interned) < INTERN_MAX:
        _interned[s] = s
    return s


def options(values: Iterable[Any]) -> Sequence[str]:
    """MAIL FROM parameters as a list, or the one shared empty tuple (most messages have
    none; an empty list each is 7 MB at 100,000 queued)."""
    return [intern(v) for v in values] or ()


def as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value
