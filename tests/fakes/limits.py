"""Per-mailbox sending limits as a provider enforces them, for the fake Graph and an aiosmtpd
upstream: a message rate (a token bucket: `rate` a second with a small `burst` for jitter on
loopback) and a rolling recipient budget. Excess is refused, as Graph (429) and Exchange
(`554 5.2.0 ... SubmissionQuotaExceededException`) do, and counted, so a test can assert that
a paced relay never met either."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session
from conftest import RecordingHandler

QUOTA_REPLY = ("554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; "
               "Failed to process message due to a permanent exception")
RATE_REPLY = "450 4.7.0 Message rate for this mailbox exceeded; try again later"


@dataclass
class MailboxLimits:
    rate: float | None = None  # messages a second per mailbox
    burst: float = 1.0  # tokens in the bucket: messages that may come closer than 1/rate
    budget: int | None = None  # recipients per `window_s` per mailbox
    window_s: float = 86400.0
    throttled: dict[str, int] = field(default_factory=dict)  # refused for the rate
    over_budget: dict[str, int] = field(default_factory=dict)  # refused for the budget
    arrivals: dict[str, list[float]] = field(default_factory=dict)  # admitted, monotonic
    _tokens: dict[str, tuple[float, float]] = field(default_factory=dict)
    _recipients: dict[str, collections.deque[tuple[float, int]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, mailbox: str, recipients: int) -> str | None:
        """None when the message may go (and it is counted), else "rate" or "budget"."""
        key = mailbox.lower()
        now = time.monotonic()
        with self.lock:
            if self.budget is not None:
                log = self._recipients.setdefault(key, collections.deque())
                while log and log[0][0] <= now - self.window_s:
                    log.popleft()
                if sum(n for _, n in log) + recipients > self.budget:
                    self.over_budget[key] = self.over_budget.get(key, 0) + 1
                    return "budget"
            if self.rate is not None:
                tokens, stamp = self._tokens.get(key, (self.burst, now))
                tokens = min(self.burst, tokens + (now - stamp) * self.rate)
                if tokens < 1:
                    self._tokens[key] = (tokens, now)
                    self.throttled[key] = self.throttled.get(key, 0) + 1
                    return "rate"
                self._tokens[key] = (tokens - 1, now)
            if self.budget is not None:
                self._recipients[key].append((now, recipients))
            self.arrivals.setdefault(key, []).append(now)
        return None


@dataclass
class LimitingHandler(RecordingHandler):
    """The recording upstream, enforcing `limits` per MAIL FROM address at the end of DATA."""

    limits: MailboxLimits = field(default_factory=MailboxLimits)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> Any:
        why = self.limits.admit(str(envelope.mail_from or ""), len(envelope.rcpt_tos))
        if why == "budget":
            return QUOTA_REPLY
        if why == "rate":
            return RATE_REPLY
        return await super().handle_DATA(server, session, envelope)
