"""The queue manager's read side: what the status page, the web console, [notify] and the
metrics see of the queue, through one public interface that changes nothing.

Rules:
- Read on the event loop, where the manager owns the state (a web request thread asks through
  `asyncio.run_coroutine_threadsafe`); every answer is a copy (frozen rows, plain dicts), so
  nothing a reader holds can change a message, and nothing the manager does later changes what
  a reader was given.
- No disk I/O: everything comes from the manager's memory (one `Queued` per message).
- No side effect: nothing here builds a delivery agent or an upstream client. A route's
  counters come from the agents the manager has built (a route that has sent nothing has
  none: empty counters); token health is relayd.auth.registry's, not the upstreams'.
- Everything outside relayd/qmgr (notify, the web pages and console, metrics, tests) reads
  the queue here and nowhere else. At 100,000 queued a page of the queue is one pass over that dict
  with a cheap filter, and rows (`Entry.summary()`, the `relayd queue list --json` item) are
  built for the page's messages only.
- The rows carry what `relayd queue list --json` and `queue show --json` print, plus the
  manager's own knowledge: the state (due / active / deferred) and the last reply per
  recipient, which only memory has.
Rejected alternative: the console reading the spool files as `relayd queue list` does. With
100,000 queued that is 100,000 file reads a page view (seconds), and it shows the state as of
the last write, not the manager's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from relayd.config import RouteConfig
from relayd.delivery.agent import DeliveryAgent, RouteStats
from relayd.qmgr.pacing import Ledger, MailboxUse
from relayd.qmgr.queued import ACTIVE, Queued
from relayd.queue import Entry


class Source(Protocol):
    """What the view reads of its queue manager (relayd.qmgr.manager.QueueManager)."""

    @property
    def agents(self) -> Mapping[str, DeliveryAgent]: ...
    @property
    def held_bytes(self) -> int: ...
    def clock(self) -> float: ...
    def route_for(self, entry: Entry) -> RouteConfig | None: ...
    def route_for_sender(self, sender: str) -> RouteConfig | None: ...
    def mailbox_use(self) -> list[MailboxUse]: ...
    @property
    def ledger(self) -> Ledger: ...
    @property
    def blocked(self) -> Mapping[str, tuple[str, float, str]]: ...

STATES = ("due", "active", "deferred")  # QueueManager's DUE, ACTIVE, DEFERRED
PAGE_MAX = 500  # rows in one page at most


@dataclass(frozen=True)
class RouteCount:
    queued: int = 0
    deferred: int = 0  # tried at least once and waiting for the next try
    oldest_deferred: float | None = None  # when the oldest deferred one was received


@dataclass(frozen=True)
class DeferredGroup:
    """A route's messages deferred longer than some time ([notify]'s deferred_after)."""

    count: int
    oldest_id: str
    oldest_sender: str
    oldest_received: float
    last_error: str


@dataclass(frozen=True)
class Filter:
    """Which messages a page shows; empty fields match everything. Addresses match as a
    case-insensitive substring (a domain finds all its addresses)."""

    route: str = ""
    sender: str = ""
    recipient: str = ""
    min_age_s: float = 0.0  # received at least this long ago
    state: str = ""  # one of STATES

    def matches(self, queued: Queued, route_name: str, now: float) -> bool:
        entry = queued.entry
        if self.route and route_name != self.route:
            return False
        if self.state and queued.state != self.state:
            return False
        if self.min_age_s and now - entry.received < self.min_age_s:
            return False
        if self.sender and self.sender.lower() not in entry.sender.lower():
            return False
        if self.recipient:
            needle = self.recipient.lower()
            if not any(needle in r.lower() for r in entry.recipients):
                return False
        return True


@dataclass(frozen=True)
class MessageRow:
    """One message as the console shows it: `summary` is `relayd queue show --json`'s object
    (the entry's envelope and state, plus route and route_pinned)."""

    id: str
    route: str  # "-" when no route of the current config sends it
    state: str
    summary: Mapping[str, Any]
    last_reply: Mapping[str, str] = field(default_factory=dict)  # recipient -> upstream reply
    entry: Entry | None = None  # a copy, for reading the bytes (message page only)
    in_memory: bool = False  # its bytes are held for its first attempt

    @property
    def attempts(self) -> int:
        return int(self.summary.get("attempts") or 0)

    @property
    def active(self) -> bool:
        return self.state == ACTIVE


@dataclass(frozen=True)
class Page:
    rows: tuple[MessageRow, ...]
    matching: int  # messages the filter accepts
    offset: int
    limit: int
    queued: int  # all messages in the queue


class QueueView:
    """Read-only questions to one queue manager (call on its event loop)."""

    def __init__(self, manager: Source, messages: Mapping[str, Queued]) -> None:
        self._manager = manager
        self._messages = messages  # the manager's own dict, read only here

    def count(self) -> int:
        """How many messages are queued."""
        return len(self._messages)

    def has(self, queue_id: str) -> bool:
        return queue_id in self._messages

    def messages(self) -> list[MessageRow]:
        """Every message, each with a copy of its entry, in the order they were queued. For
        tests and small queues: the console pages through `page`."""
        return [self._row(q, name, with_entry=True) for q, name in self._routed()]

    def route_for(self, entry: Entry) -> RouteConfig | None:
        """The route that sends a queued entry now (its pinned route, else its sender's)."""
        return self._manager.route_for(entry)

    def route_for_sender(self, sender: str) -> RouteConfig | None:
        """The route the current config sends `sender`'s mail by (the sender policy's)."""
        return self._manager.route_for_sender(sender)

    def held_bytes(self) -> int:
        """Bytes of fresh messages held in memory for their first attempt."""
        return self._manager.held_bytes

    def route_stats(self) -> dict[str, RouteStats]:
        """Route name -> a copy of its agent's counters, for the routes that have an agent
        (one that has sent nothing has none yet; read it as RouteStats())."""
        return {name: dataclasses.replace(agent.stats)
                for name, agent in list(self._manager.agents.items())}

    def held_until(self, now: float) -> dict[str, float]:
        """Route name -> when its hold ends (its upstream found unreachable), for the routes
        whose agent holds them now."""
        out = {}
        for name, agent in list(self._manager.agents.items()):
            held = agent.held_s()
            if held is not None:
                out[name] = now + held
        return out

    def token_expiries(self) -> dict[str, dict[str, float]]:
        """Route name -> account -> when its current access token expires, for the routes
        whose agent holds tokens (the metrics' gauge)."""
        return {name: agent.upstream.token_expiries()
                for name, agent in list(self._manager.agents.items())}

    def _routed(self) -> Iterator[tuple[Queued, str]]:
        manager = self._manager
        for queued in self._messages.values():
            route = manager.route_for(queued.entry)
            yield queued, route.name if route else "-"

    def route_counts(self) -> dict[str, RouteCount]:
        """Route name -> its counts; "-" holds messages without a route."""
        totals: dict[str, list[Any]] = {}
        for queued, name in self._routed():
            item = totals.setdefault(name, [0, 0, None])
            item[0] += 1
            if queued.state == "deferred" and queued.entry.attempts:
                item[1] += 1
                received = queued.entry.received
                item[2] = received if item[2] is None else min(item[2], received)
        return {name: RouteCount(*item) for name, item in totals.items()}

    def mailboxes(self) -> list[MailboxUse]:
        """Each busy sending mailbox: its budget's use, rate and messages waiting for it
        (relayd.qmgr.pacing; frozen rows)."""
        return self._manager.mailbox_use()

    def budget_window_s(self) -> float:
        """The window a sending mailbox's daily budget counts over (relayd.qmgr.pacing)."""
        return self._manager.ledger.window_s

    def blocked(self) -> dict[str, tuple[str, float, str]]:
        """Mailboxes the provider said are blocked for sending: mailbox -> (route, when,
        reply), a copy."""
        return dict(self._manager.blocked)

    def depth(self) -> tuple[int, float]:
        """Queue depth and the age in seconds of the oldest message."""
        messages = self._messages
        if not messages:
            return 0, 0.0
        oldest = min(q.entry.received for q in messages.values())
        return len(messages), max(0.0, self._manager.clock() - oldest)

    def page(self, flt: Filter, offset: int = 0, limit: int = 50) -> Page:
        """The matching messages [offset, offset + limit), in the order they were queued."""
        limit = max(1, min(limit, PAGE_MAX))
        offset = max(0, offset)
        now = self._manager.clock()
        rows: list[MessageRow] = []
        matching = 0
        for queued, name in self._routed():
            if not flt.matches(queued, name, now):
                continue
            if offset <= matching < offset + limit:
                rows.append(self._row(queued, name, with_entry=False))
            matching += 1
        return Page(tuple(rows), matching, offset, limit, len(self._messages))

    def ids(self, flt: Filter | None = None) -> list[str]:
        flt = flt or Filter()
        now = self._manager.clock()
        return [q.id for q, name in self._routed() if flt.matches(q, name, now)]

    def queued(self, queue_ids: Iterable[str]) -> list[str]:
        """Those of `queue_ids` still in the queue."""
        return [qid for qid in queue_ids if qid in self._messages]

    def message(self, queue_id: str) -> MessageRow | None:
        queued = self._messages.get(queue_id)
        if queued is None:
            return None
        route = self._manager.route_for(queued.entry)
        return self._row(queued, route.name if route else "-", with_entry=True)

    def deferred(self, limit: int) -> tuple[list[MessageRow], int]:
        """The deferred messages (tried, waiting), oldest first: up to `limit`, and how many."""
        waiting = [(q, name) for q, name in self._routed()
                   if q.state == "deferred" and q.entry.attempts]
        waiting.sort(key=lambda item: item[0].entry.received)
        return [self._row(q, name, with_entry=False) for q, name in waiting[:limit]], \
            len(waiting)

    def deferred_by_route(self, now: float, older_than_s: float,
                          skip: Callable[[str, str], bool]) -> dict[str, DeferredGroup]:
        """Per route, the messages tried and waiting that were received more than
        `older_than_s` before `now`, leaving out those `skip(queue_id, client)` names."""
        groups: dict[str, list[Any]] = {}
        for queued, name in self._routed():
            entry = queued.entry
            if queued.state != "deferred" or not entry.attempts or \
                    now - entry.received <= older_than_s or skip(entry.id, entry.client):
                continue
            group = groups.get(name)
            if group is None:
                groups[name] = [1, entry.id, entry.sender, entry.received, entry.last_error]
                continue
            group[0] += 1
            if entry.received < group[3]:
                group[1:] = [entry.id, entry.sender, entry.received, entry.last_error]
        return {name: DeferredGroup(*g) for name, g in groups.items()}

    @staticmethod
    def _row(queued: Queued, route_name: str, *, with_entry: bool) -> MessageRow:
        entry = queued.entry
        # Through JSON: a deep copy, and exactly what `queue show --json` would print.
        summary = json.loads(json.dumps({
            **entry.summary(), "route": None if route_name == "-" else route_name,
            "route_pinned": entry.route is not None}))
        copy = None
        if with_entry:
            copy = dataclasses.replace(entry, recipients=list(entry.recipients),
                                       rcpt={r: dataclasses.replace(s)
                                             for r, s in entry.rcpt.items()})
        return MessageRow(entry.id, route_name, queued.state, summary,
                          {r: str(reply) for r, reply in queued.last_reply.items()}, copy,
                          queued.data is not None)
