"""The decision after an attempt, as a pure function: what each recipient is now, and when next.

`decide(message, report, now, policy)` takes what the delivery agent reported (one result per
recipient, or the fact that the route was held and nothing was tried), the clock and the queue
policy, and returns an `Outcome`. It does no I/O; the queue manager carries the outcome out
afterwards in an order a crash cannot turn into a loss (store the bounce, then record the
failure, then remove).

Rules:
- A recipient the agent reports delivered is delivered; failed is failed; deferred, or missing
  from the report, stays pending.
- A failure that `relayd.reply.PROVIDER_REPLIES` says clears by itself (daily quotas) or is a
  configuration problem (basic SMTP AUTH turned off) stays pending instead, and the next try is no
  sooner than the table says, even past `retry_max`.
- The next try of a pending recipient: exponential backoff from `retry_min`, doubling per failed
  try since the last `relayd queue retry`, capped at `retry_max`; an upstream's Retry-After wins
  (still capped at `retry_max`, at least a second).
- A held route (the upstream was found unreachable moments ago) tries nothing: the try is not
  counted, the backoff does not grow, and the next try is when the hold ends.
- Once a message is older than `max_age`, whatever is still pending fails with status 4.4.7
  (RFC 3463: delivery time expired) and the last reply in the text; no try is scheduled past the
  moment it expires, so a day-long quota hint still gets its last try at `max_age`.
- A bounce's failures are never bounced (`bounce` is False for a null-sender message); the
  manager logs them and drops them.
Rejected alternative: deciding inside the agent, next to the protocol. The agent would then need
the queue policy and the message's age, and the rules above could not be tested without a server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from relayd.delivery import Status
from relayd.delivery.agent import Report
from relayd.reply import Reply, reinterpret

NO_RESULT = Reply.local("no result from the upstream for this recipient")
MIN_DELAY_S = 1.0


@dataclass(frozen=True)
class Policy:
    retry_min_s: float
    retry_max_s: float
    max_age_s: float


@dataclass(frozen=True)
class Attempted:
    """What the decision needs to know of the message."""

    pending: Sequence[str]  # the recipients this attempt was for
    received: float  # epoch seconds
    backoff: int  # failed tries since the last retry request (0 before the first)
    is_bounce: bool
    last_reply: Mapping[str, Reply] = field(default_factory=dict)  # per recipient, if any


@dataclass(frozen=True)
class Failed:
    reply: Reply
    status: str  # the DSN status (RFC 3463)


@dataclass(frozen=True)
class Outcome:
    delivered: dict[str, Reply]
    failed: dict[str, Failed]
    pending: dict[str, Reply]
    tried: bool  # counts as a try (False when the route was held)
    backoff: int  # the message's new backoff level
    next_attempt: float | None  # None when nothing is pending
    expired: bool
    bounce: bool  # whether `failed` needs a bounce to the sender
    hints: tuple[str, ...] = ()  # from the provider-reply table, for the log


def backoff_delay(level: int, policy: Policy) -> float:
    """Seconds before the next try after `level` failed tries."""
    return float(min(policy.retry_max_s, policy.retry_min_s * 2.0 ** max(0, level - 1)))


def decide(message: Attempted, report: Report, now: float, policy: Policy) -> Outcome:
    delivered: dict[str, Reply] = {}
    failed: dict[str, Failed] = {}
    pending: dict[str, Reply] = {}
    hints: list[str] = []
    not_before = 0.0  # from the provider-reply table
    tried = report.held_s is None
    for rcpt in message.pending:
        result = report.results.get(rcpt)
        if not tried:
            pending[rcpt] = report.held_reply or message.last_reply.get(rcpt) or NO_RESULT
            continue
        if result is None:
            pending[rcpt] = NO_RESULT
            continue
        meaning = reinterpret(result.reply) if result.status is not Status.DELIVERED else None
        if meaning is not None:
            hints.append(meaning.hint)
            not_before = max(not_before, meaning.retry_after_s)
            pending[rcpt] = result.reply
        elif result.status is Status.DELIVERED:
            delivered[rcpt] = result.reply
        elif result.status is Status.FAILED:
            failed[rcpt] = Failed(result.reply, result.reply.status(permanent=True))
        else:
            pending[rcpt] = result.reply

    backoff = message.backoff + 1 if tried and pending else message.backoff
    expires_at = message.received + policy.max_age_s
    expired = bool(pending) and now >= expires_at
    if expired:
        age_h = (now - message.received) / 3600
        for rcpt, last in pending.items():
            text = (f"message expired after {age_h:.1f} hours in the queue; "
                    f"last error: {last or 'none'}")
            # RFC 3463 4.4.7: delivery time expired
            failed[rcpt] = Failed(Reply(None, "4.4.7", text, "relayd"), "4.4.7")
        pending = {}

    next_attempt = None
    if pending:
        if not tried:
            delay = max(report.held_s or 0.0, MIN_DELAY_S)
        elif report.retry_after is not None:
            delay = min(policy.retry_max_s, max(report.retry_after, MIN_DELAY_S))
        else:
            delay = backoff_delay(backoff, policy)
        delay = max(delay, not_before)
        next_attempt = min(now + delay, max(expires_at, now + MIN_DELAY_S))
    return Outcome(delivered=delivered, failed=failed, pending=pending, tried=tried,
                   backoff=backoff, next_attempt=next_attempt, expired=expired,
                   bounce=bool(failed) and not message.is_bounce, hints=tuple(hints))
