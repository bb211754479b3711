"""What an upstream answered, in one shape for every protocol, and the provider replies that do
not mean what their class says.

A `Reply` is filled by each delivery agent from its own protocol: an SMTP upstream's reply as it
came (`550 5.1.1 User unknown`); Graph's HTTP status and error code mapped to the SMTP code and
RFC 3463 status that say the same thing (a 404 for a mailbox is `550 5.1.1`, a send-as denial
`550 5.7.1`), with Graph's own words kept in the text; an EWS response code likewise. The bounce's
`Status:` and `Diagnostic-Code:` come from it, so a permanent failure never shows a 4.x.x status
because some number happened to start with 4.

Rules:
- `smtp_code` is an SMTP reply code and nothing else (never an HTTP status). `enhanced` is an
  RFC 3463 status `class.subject.detail`. `source` names the protocol the words came from
  (`smtp`, `graph`, `ews`, `relayd`), which is the DSN's diagnostic type.
- `status(permanent)` is the DSN status: the enhanced code when it agrees with the outcome's class,
  else the class's generic `5.0.0` / `4.0.0`.

Provider replies that lie about their class (`PROVIDER_REPLIES`): a few 5xx answers clear by
themselves (daily quotas) or are configuration problems that a person fixes without the mail
being at fault (basic SMTP AUTH turned off). Bouncing them would return mail that goes out
tomorrow or after the admin's fix, so they defer, no sooner than the row says, and bounce only
when the message reaches `queue.max_age`. Each row cites where the reply is documented.
Rejected alternative: a per-route `defer_codes` list; admins would each have to discover these
replies the hard way, which is exactly what this table saves them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ENHANCED_RE = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b\s*")
MAX_TEXT_CHARS = 900


@dataclass(frozen=True)
class Reply:
    smtp_code: int | None
    enhanced: str | None
    text: str
    source: str = "smtp"

    @classmethod
    def smtp(cls, code: int | None, text: str, source: str = "smtp") -> Reply:
        """A reply as an SMTP server words it: the enhanced status, if any, starts the text."""
        text = " ".join(str(text).split())
        m = ENHANCED_RE.match(text)
        enhanced = None
        if m:
            enhanced = ".".join(m.group(1, 2, 3))
            text = text[m.end():]
        return cls(code, enhanced, text, source)

    @classmethod
    def local(cls, text: str, enhanced: str | None = None) -> Reply:
        """relayd's own words (a timeout, an internal error), no upstream code."""
        return cls(None, enhanced, text, "relayd")

    def __str__(self) -> str:
        parts = [str(self.smtp_code)] if self.smtp_code is not None else []
        if self.enhanced:
            parts.append(self.enhanced)
        parts.append(self.text)
        return " ".join(p for p in parts if p)

    def status(self, permanent: bool) -> str:
        """The RFC 3463 status for a DSN of this outcome's class."""
        want = "5" if permanent else "4"
        if self.enhanced and self.enhanced[0] == want:
            return self.enhanced
        return f"{want}.0.0"

    def one_line(self) -> str:
        return " ".join(str(self).split())[:MAX_TEXT_CHARS]


@dataclass(frozen=True)
class Reinterpretation:
    """What a provider reply in the table means instead of its class."""

    retry_after_s: float  # the next try no sooner than this
    hint: str  # said with the reply in the log and the queue, for the admin


HOUR_S = 3600.0
DAY_S = 86400.0
BLOCKED_SENDER = (r"\b5\.1\.8\b.*(outbound sender|denied)|bad outbound sender|"
                  r"(sender|user|mailbox|account)\b[^.]{0,60}\brestricted\b|"
                  r"restricted (sender|from sending)|OutboundSpamException")
BLOCKED_HINT = ("the provider has blocked this mailbox for sending (Exchange Online: "
                "Restricted entities, after it passed a sending limit); an admin releases it "
                "in the Microsoft Defender portal (Email & collaboration > Review > Restricted "
                "entities) or with Remove-BlockedSenderAddress -SenderAddress MAILBOX, then "
                "`relayd queue retry --all`")
_BLOCKED_RE = re.compile(BLOCKED_SENDER, re.IGNORECASE)


@dataclass(frozen=True)
class _Row:
    pattern: re.Pattern[str]
    meaning: Reinterpretation


def _row(pattern: str, retry_after_s: float, hint: str) -> _Row:
    return _Row(re.compile(pattern, re.IGNORECASE), Reinterpretation(retry_after_s, hint))


PROVIDER_REPLIES: tuple[_Row, ...] = (
    # Exchange Online: a mailbox past 10,000 recipients in 24 hours (Exchange Online limits,
    # "Receiving and sending limits"); clears by itself within a day.
    _row(r"SubmissionQuotaExceeded", DAY_S,
         "the mailbox passed its daily recipient limit (Exchange Online: 10,000 a day); "
         "deferred until the quota clears"),
    # Gmail: "550 5.4.5 Daily user sending limit exceeded" / "... quota exceeded" (Google
    # Workspace Admin Help, "Gmail sending limits"), a rolling 24-hour window.
    _row(r"\b5\.4\.5\b.*(sending limit|quota)|daily user sending (limit|quota)", DAY_S,
         "the account passed its daily sending limit (Gmail: 2,000 a day); deferred until it "
         "clears"),
    # Exchange Online with basic SMTP AUTH turned off (Microsoft: "Deprecation of Basic
    # authentication in Exchange Online", SMTP AUTH): 535 5.7.139 tenant-wide, 550 5.7.30 for
    # client submission. Not the message's fault: an admin switches the route to OAuth.
    _row(r"\b5\.7\.139\b|\b5\.7\.30\b|Basic authentication is not supported", HOUR_S,
         "the provider has turned off password (basic) SMTP AUTH; change this route to "
         'auth = "xoauth2" or upstream = "graph" (see docs/graph.md)'),
    # Graph: ErrorExceededMessageLimit, the mailbox's sending limit (Graph throttling limits,
    # Outlook service); it clears within a day.
    _row(r"ErrorExceededMessageLimit", HOUR_S,
         "the mailbox passed its sending limit; deferred until it clears"),
    # Graph: MailboxConcurrency, more than 4 concurrent requests for one mailbox (Graph
    # throttling limits), whatever status it comes with; a matter of seconds: its Retry-After
    # (or the backoff) decides, as for any deferral.
    _row(r"MailboxConcurrency", 0.0, "too many concurrent requests for this mailbox"),
    # EWS: ErrorServerBusy (EWS throttling in Exchange), whatever response class it comes
    # with; its own BackOffMilliseconds decides the next try.
    _row(r"ErrorServerBusy", 0.0, "Exchange is throttling this account"),
    # Exchange Online: a mailbox on the tenant's Restricted entities list (it passed a sending
    # limit, or looked compromised) answers "550 5.1.8 Access denied, bad outbound sender" over
    # SMTP (Exchange Online NDR 5.1.8) and ErrorAccessDenied with the same words through Graph
    # and EWS. It sends nothing, not even from Outlook, until an admin releases it: not the
    # message's fault, so it waits rather than bounce.
    _row(BLOCKED_SENDER, HOUR_S, BLOCKED_HINT),
)


def reinterpret(reply: Reply) -> Reinterpretation | None:
    """The table's meaning for `reply`, or None when it means what its class says."""
    words = str(reply)
    for row in PROVIDER_REPLIES:
        if row.pattern.search(words):
            return row.meaning
    return None


def blocked_for_sending(reply: Reply) -> bool:
    """Whether the provider says the sending mailbox is blocked (BLOCKED_SENDER)."""
    return _BLOCKED_RE.search(str(reply)) is not None
