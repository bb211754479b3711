"""The queue manager's record of one message (`Queued`) and its states. Shared by the manager
(which alone changes it) and its read side (relayd.qmgr.view, which copies from it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relayd.bounce import Failure
from relayd.queue import Entry
from relayd.reply import Reply

DUE = "due"
ACTIVE = "active"
DEFERRED = "deferred"


# Shared by every Queued until its first failure or reply: never written (`Queued.failed`
# and `Queued.replied` give it a dict of its own first). Two empty dicts per message are 13 MB
# at 100,000 queued.
_NO_FAILURES: dict[str, Failure] = {}
_NO_REPLIES: dict[str, Reply] = {}


@dataclass(slots=True)
class Queued:
    """The manager's record of one message: the spool entry plus what lives only in memory."""

    entry: Entry
    state: str = DUE
    data: bytes | None = field(default=None, repr=False)  # held for the first attempt
    deleted: bool = False  # delete requested while active
    unbounced: dict[str, Failure] = field(default_factory=lambda: _NO_FAILURES)
    # ^ failed, bounce not stored
    last_reply: dict[str, Reply] = field(default_factory=lambda: _NO_REPLIES)
    lane: tuple[str, str] | None = None  # (route, lane key) while an attempt holds a place

    def failed(self, rcpt: str, failure: Failure) -> None:
        if self.unbounced is _NO_FAILURES:
            self.unbounced = {}
        self.unbounced[rcpt] = failure

    def replied(self, rcpt: str, reply: Reply) -> None:
        if self.last_reply is _NO_REPLIES:
            self.last_reply = {}
        self.last_reply[rcpt] = reply

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def attempts(self) -> int:
        return self.entry.attempts

    @property
    def active(self) -> bool:
        return self.state == ACTIVE

    def to_try(self) -> list[str]:
        """Recipients still to deliver: pending, and not failed awaiting their bounce."""
        return [r for r in self.entry.pending() if r not in self.unbounced]
