"""Per sending mailbox limits: a message rate and a rolling 24-hour recipient budget.

A relay that sends as many users through one account inherits each provider's per-mailbox
limits, and crossing some of them costs more than a deferral: Exchange Online puts a mailbox
past its recipient limits on the tenant's Restricted entities list, and it then sends nothing
until an admin releases it. So relayd paces each sending mailbox before the provider has to.

The sending mailbox is the one a message is sent as or from (`Upstream.sending_mailbox`): the
route's fixed `mailbox`, else the account an SMTP route signs in as, else the envelope sender.
Each one is a lane of its route in the queue manager (the lane Graph's 4 requests per mailbox
already made), and the decision for its next message is `decide`, a pure function of that
mailbox's `Usage`, its `Limits`, the message's recipient count and the clock:

- over the budget for good (more recipients than the whole budget): `TooMany`; the manager fails
  the message with `550 5.5.3` naming the limit (it could never go out whole);
- over the budget for now: `WaitBudget`, deferred (never bounced, no try counted) until the
  oldest counts leave the window (`Usage.frees_at`); the queue says why and until when;
- over the rate: `WaitRate`, the message waits in its lane, in memory, for its slot;
- else `GO`: the manager `take`s the slot and reserves the recipients, and `settle`s the
  reservation with the recipients the attempt delivered.
A mailbox waiting for its rate or budget holds no session and no place of the route's
`max_connections`: the route's other mailboxes are not delayed by it.

Rules:
- Rate: messages evenly spaced, `per_s / count` apart (30/min: one every 2 s), never caught up
  after a delay. Rejected: a sliding window of `count` per `per_s`, which lets `count` go in
  one burst; a provider that measures a shorter span sees the burst, and one quota with two
  rates (Azure Communication Services: 30 a minute and 100 an hour) cannot be kept by one
  burst window, while 100/hour evenly spaced keeps both.
- Budget: recipients, counted when delivered (an attempt that delivered nothing costs nothing),
  reserved while an attempt is under way so that parallel attempts cannot overrun it together.
  Counts are kept in `BUCKETS` buckets of the window (5 minutes for 24 hours), not per message:
  a bucket leaves the window a bucket's width after its last count could have, so a budget
  frees at most 5 minutes later than an exact log would say, never earlier.
- Counts survive a restart: `Ledger.to_json` is written to the spool's state (`state/mailboxes`)
  by the spool's writer thread, at most every `SAVE_EVERY_S` while counts change (not an fsync
  per message); a crash loses at most that last second's counts. The rate is not kept.

Defaults (`provider_limits`), where the provider documents a per-mailbox limit; a route's
`mailbox_rate_limit` / `mailbox_daily_recipients` replace them, `0` turns one off:
- Exchange Online (Graph, EWS and SMTP AUTH at Microsoft 365): 30 messages a minute and 10,000
  recipients a day per mailbox ("Exchange Online limits", Sending limits: message rate limit,
  recipient rate limit; FIELD-NOTES). Graph's endpoints in every cloud, EWS and SMTP at
  office365.com / outlook.com hosts.
- Gmail / Google Workspace: 2,000 messages a day per user ("Gmail sending limits in Google
  Workspace"). The budget counts recipients, so 2,000 recipients keeps the message limit
  whatever each message's recipient count (Workspace's own recipient limit is 10,000 a day: a
  route whose mail has several recipients each may set that).
- Azure Communication Services (SMTP at azurecomm.net): 30 mails a minute and 100 an hour for a
  resource until support raises it ("Email client library overview", API throttling and
  timeouts); one route is one resource and signs in as one account, so `100/hour`.
- Anything else (on-premises Exchange, smarthosts, test servers, High Volume Email, the
  outbox): none, unless the route sets them.
"""

from __future__ import annotations

import collections
import json
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from relayd.config import NO_RATE, RateLimit, RouteConfig
from relayd.reply import Reply, blocked_for_sending

WINDOW_S = 86400.0  # the budget's rolling window: Exchange Online and Gmail count 24 hours
BUCKETS = 288  # counts per window kept in this many buckets (5 minutes each for 24 hours)
SAVE_EVERY_S = 1.0  # changed counts are written at most this often
NOTICE_SHARE = 0.8  # [notify] tells the admin when a mailbox has spent this share of a budget
STATE_VERSION = 1

EXCHANGE_ONLINE = "Exchange Online"
GMAIL = "Gmail"
ACS = "Azure Communication Services"


@dataclass(frozen=True)
class Limits:
    rate: RateLimit | None  # messages per period, evenly spaced; None: no limit
    daily_recipients: int  # recipients per WINDOW_S; 0: no budget
    source: str = ""  # whose default a figure is ("" when the route set both)

    @property
    def any(self) -> bool:
        return self.rate is not None or self.daily_recipients > 0


_PROVIDER_DEFAULTS = {
    EXCHANGE_ONLINE: (RateLimit(30, 60.0), 10_000),
    GMAIL: (None, 2_000),
    ACS: (RateLimit(100, 3600.0), 0),
}
_MICROSOFT_GRAPH_SUFFIXES = ("microsoft.com", "microsoft.us", "chinacloudapi.cn")
_EXCHANGE_ONLINE_SUFFIXES = ("office365.com", "outlook.com", "office365.us", "outlook.cn")


def _host(url_or_host: str | None) -> str:
    text = url_or_host or ""
    if "//" in text:
        text = urllib.parse.urlsplit(text).hostname or ""
    return text.lower().rstrip(".")


def _ends(host: str, suffixes: tuple[str, ...]) -> bool:
    return any(host == s or host.endswith("." + s) for s in suffixes)


def provider_of(route: RouteConfig) -> str | None:
    """Whose documented per-mailbox limits apply to a route, by where it sends."""
    if route.upstream == "graph":
        return EXCHANGE_ONLINE if _ends(_host(route.graph.endpoint), _MICROSOFT_GRAPH_SUFFIXES) \
            else None
    if route.upstream == "ews":
        host = _host(route.ews.service_endpoint or route.ews.server)
        return EXCHANGE_ONLINE if _ends(host, _EXCHANGE_ONLINE_SUFFIXES) else None
    if route.upstream == "smtp":
        host = _host(route.smtp.host)
        if _ends(host, _EXCHANGE_ONLINE_SUFFIXES):
            return EXCHANGE_ONLINE
        if _ends(host, ("gmail.com", "googlemail.com")):
            return GMAIL
        if _ends(host, ("azurecomm.net",)):
            return ACS
    return None


def limits_for(route: RouteConfig) -> Limits:
    """The route's per-mailbox limits: its own keys, else its provider's defaults."""
    provider = provider_of(route)
    rate, budget = _PROVIDER_DEFAULTS.get(provider or "", (None, 0))
    source = []
    if route.mailbox_rate_limit is not None:
        rate = None if route.mailbox_rate_limit == NO_RATE else route.mailbox_rate_limit
    elif rate is not None:
        source.append("rate")
    if route.mailbox_daily_recipients is not None:
        budget = route.mailbox_daily_recipients
    elif budget:
        source.append("budget")
    return Limits(rate, budget, f"{provider}'s default" if source and provider else "")


# -- one mailbox's counts -----------------------------------------------------------------------


class Usage:
    """One sending mailbox's recent recipients (buckets of [start, count], oldest first), the
    recipients of attempts under way, and its next rate slot (epoch seconds)."""

    __slots__ = ("buckets", "total", "reserved", "next_slot", "window_s", "route")

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.route = ""  # the route that last sent as it (the status page's, the metrics')
        self.buckets: collections.deque[list[float]] = collections.deque()
        self.total = 0  # the buckets' counts
        self.reserved = 0
        self.next_slot = 0.0
        self.window_s = window_s

    @property
    def width(self) -> float:
        return self.window_s / BUCKETS

    def _expires(self, start: float) -> float:
        return start + self.width + self.window_s

    def used(self, now: float) -> int:
        """Recipients counted within the window at `now`, with those reserved."""
        gone = 0
        for start, count in self.buckets:
            if self._expires(start) > now:
                break
            gone += int(count)
        return self.total - gone + self.reserved

    def prune(self, now: float) -> None:
        while self.buckets and self._expires(self.buckets[0][0]) <= now:
            self.total -= int(self.buckets.popleft()[1])

    def add(self, count: int, now: float) -> None:
        self.prune(now)
        if count <= 0:
            return
        start = now - now % self.width
        if self.buckets and self.buckets[-1][0] == start:
            self.buckets[-1][1] += count
        else:
            self.buckets.append([start, float(count)])
        self.total += count

    def frees_at(self, need: int, budget: int, now: float) -> float:
        """When `need` more recipients fit in the budget if nothing else is sent: as the oldest
        buckets leave the window (recipients under way count as sent now)."""
        excess = self.used(now) + need - budget
        if excess <= 0:
            return now
        for start, count in self.buckets:
            expires = self._expires(start)
            if expires <= now:
                continue
            excess -= int(count)
            if excess <= 0:
                return expires
        return self._expires(now - now % self.width)

    def is_idle(self, now: float) -> bool:
        return not self.reserved and self.used(now) == 0 and self.next_slot <= now


# -- the decision ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Go:
    pass


@dataclass(frozen=True)
class WaitRate:
    until: float


@dataclass(frozen=True)
class WaitBudget:
    until: float
    used: int
    budget: int


@dataclass(frozen=True)
class TooMany:
    recipients: int
    budget: int


GO = Go()
Decision = Go | WaitRate | WaitBudget | TooMany


def decide(usage: Usage, limits: Limits, recipients: int, now: float) -> Decision:
    """May a message with `recipients` recipients start now from this mailbox? Pure."""
    budget = limits.daily_recipients
    if budget:
        if recipients > budget:
            return TooMany(recipients, budget)
        used = usage.used(now)
        if used + recipients > budget:
            return WaitBudget(usage.frees_at(recipients, budget, now), used, budget)
    if limits.rate is not None and now < usage.next_slot:
        return WaitRate(usage.next_slot)
    return GO


def take(usage: Usage, limits: Limits, recipients: int, now: float) -> int:
    """After GO: the rate slot is used and the recipients reserved; returns the reservation."""
    if limits.rate is not None and limits.rate.count:
        usage.next_slot = max(now, usage.next_slot) + limits.rate.per_s / limits.rate.count
    reserved = recipients if limits.daily_recipients else 0
    usage.reserved += reserved
    return reserved


def settle(usage: Usage, reserved: int, delivered: int, now: float) -> None:
    """An attempt is over: its reservation goes, the recipients it delivered count."""
    usage.reserved = max(0, usage.reserved - reserved)
    usage.add(delivered, now)


def is_blocked(reply: Reply) -> bool:
    """The provider says the mailbox is blocked for sending (relayd.reply.BLOCKED_SENDER)."""
    return blocked_for_sending(reply)


# -- words ----------------------------------------------------------------------------------------


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _window_words(window_s: float) -> str:
    if window_s == WINDOW_S:
        return "24 hours"
    return f"{window_s:g} s"


def wait_text(mailbox: str, route: str, wait: WaitBudget, window_s: float) -> str:
    """The queue's reason for a message deferred for its mailbox's budget."""
    return (f"waiting for mailbox {mailbox}'s budget (frees at {stamp(wait.until)}): "
            f"{wait.used} of {wait.budget} recipients sent in the last "
            f"{_window_words(window_s)} (routes.{route}.mailbox_daily_recipients)")


def too_many_reply(mailbox: str, route: str, too: TooMany, window_s: float) -> Reply:
    return Reply(550, "5.5.3",
                 f"the message has {too.recipients} recipients, more than mailbox {mailbox} may "
                 f"send to in {_window_words(window_s)} ({too.budget}, "
                 f"routes.{route}.mailbox_daily_recipients); send it as several messages",
                 "relayd")


# -- all mailboxes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MailboxUse:
    """What the status page, the metrics and [notify] show of one mailbox."""

    route: str
    mailbox: str
    used: int
    budget: int
    rate: RateLimit | None
    frees_at: float | None  # when the oldest counts leave the window (None: nothing counted)
    waiting: int  # messages waiting for its rate or budget


class Ledger:
    """Every sending mailbox's Usage, by lower-cased address (the provider counts a mailbox,
    whichever route sends as it), and whether the counts changed since the last save."""

    def __init__(self, window_s: float | None = None) -> None:
        self.window_s = WINDOW_S if window_s is None else window_s
        self.usage: dict[str, Usage] = {}
        self.dirty = False

    def of(self, mailbox: str) -> Usage:
        usage = self.usage.get(mailbox)
        if usage is None:
            usage = self.usage[mailbox] = Usage(self.window_s)
        return usage

    def settle(self, mailbox: str, reserved: int, delivered: int, now: float) -> None:
        usage = self.usage.get(mailbox)
        if usage is None:
            return
        settle(usage, reserved, delivered, now)
        if delivered:
            self.dirty = True

    def forget_idle(self, now: float) -> None:
        for mailbox, usage in list(self.usage.items()):
            usage.prune(now)
            if usage.is_idle(now):
                del self.usage[mailbox]

    def to_json(self, now: float) -> bytes:
        out: dict[str, Any] = {}
        for mailbox, usage in self.usage.items():
            usage.prune(now)
            if usage.buckets:
                out[mailbox] = {"route": usage.route,
                                "buckets": [[start, int(count)] for start, count in usage.buckets]}
        return json.dumps({"v": STATE_VERSION, "window": self.window_s, "mailboxes": out},
                          separators=(",", ":")).encode()

    def load(self, data: bytes, now: float) -> None:
        """Counts saved before a restart (ValueError if the file is not ours)."""
        raw = json.loads(data)
        if not isinstance(raw, dict) or not isinstance(raw.get("mailboxes"), dict):
            raise ValueError("not a mailbox counts file")
        for mailbox, saved in raw["mailboxes"].items():
            usage = self.of(str(mailbox))
            usage.route = str(saved.get("route", ""))
            for start, count in saved["buckets"]:
                if count > 0 and usage._expires(float(start)) > now:
                    usage.buckets.append([float(start), float(int(count))])
                    usage.total += int(count)
            if not usage.buckets:
                del self.usage[str(mailbox)]
