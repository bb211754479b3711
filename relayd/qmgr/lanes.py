"""Each sending mailbox of a route is a lane: what its upstream lets run at once for it, and
its rate and daily budget (relayd.qmgr.pacing decides; a message over the rate waits in its
lane holding no session, one over the budget is deferred with the reason, one over the whole
budget fails). The counts are the ledger's, saved through the spool now and then.

`Lanes` is a part of relayd.qmgr.manager.QueueManager (a mixin: the state is the manager's).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import relayd.qmgr.pacing as pacing
from relayd.config import Config, RouteConfig
from relayd.delivery import RecipientResult, Status
from relayd.delivery.agent import DeliveryAgent, Report
from relayd.qmgr.queued import ACTIVE, DEFERRED, DUE, Queued
from relayd.queue import Entry, Spool

log = logging.getLogger("relayd.qmgr.manager")


@dataclass(slots=True)
class _Lane:
    """Attempts under way for one sending mailbox of a route (Upstream.lane), and the due
    messages that wait for one of them to finish or for the mailbox's next rate slot, in
    arrival order."""

    limit: int  # attempts at once; 0: no limit of the upstream's own
    mailbox: str = ""
    limits: pacing.Limits | None = None  # the mailbox's rate and budget (None: none)
    busy: int = 0
    waiting: collections.deque[str] = field(default_factory=collections.deque)
    timer: asyncio.TimerHandle | None = None  # wakes the lane at its next rate slot


class Lanes:
    """The lanes and pacing of relayd.qmgr.manager.QueueManager."""

    config: Config
    spool: Spool
    clock: Callable[[], float]
    ledger: pacing.Ledger
    blocked: dict[str, tuple[str, float, str]]
    _messages: dict[str, Queued]
    _due: dict[str, collections.deque[str]]
    _lanes: dict[tuple[str, str], _Lane]
    _limits: dict[str, tuple[RouteConfig, pacing.Limits]]
    _reserved: dict[str, tuple[str, int]]
    _budget_waits: dict[str, str]
    _usage_saved: float
    _active: int
    _idle: asyncio.Event

    if TYPE_CHECKING:
        def route_for(self, entry: Entry) -> RouteConfig | None: ...
        def _pump(self, route_name: str) -> None: ...
        def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None: ...
        def _release(self, queued: Queued) -> None: ...
        def _defer(self, queued: Queued, when: float) -> None: ...
        def _forget(self, queued: Queued, why: str) -> None: ...
        async def _save_state(self, entry: Entry) -> None: ...
        async def _settle(self, queued: Queued, route: RouteConfig | None, report: Report,
                          started: float) -> None: ...
        def _record(self, event: str, queued: Queued, route: RouteConfig | None,
                    recipients: list[str], **fields: Any) -> None: ...

    def _enter_lane(self, queued: Queued, route_name: str, agent: DeliveryAgent) -> bool:
        """Take a place in the message's lane for an attempt, or leave it waiting in the lane
        (False). A lane is one sending mailbox of a route: what the upstream lets run at once
        for it (Graph's 4 requests per mailbox: without lanes, one mailbox's backlog took all
        of the route's sessions while the other mailboxes' mail waited behind it), and its
        rate and budget (pacing: a message over the rate waits here for its slot, holding no
        session; one over the budget is deferred; one over the whole budget fails)."""
        entry = queued.entry
        lane_of = agent.upstream.lane(entry.sender, entry.recipients)
        limits = self.limits_of(agent.route)
        if lane_of is None:
            if not limits.any:
                return True
            mailbox = agent.upstream.sending_mailbox(entry.sender, entry.recipients)
            if mailbox is None:
                return True
            lane_of = (mailbox.lower(), 0)
        key, limit = (route_name, lane_of[0]), lane_of[1]
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(limit, lane_of[0])
        lane.limit = limit
        lane.limits = limits if limits.any else None
        if limit and lane.busy >= limit:
            lane.waiting.append(queued.id)
            return False
        if lane.limits is not None:
            self._budget_waits.pop(queued.id, None)
            usage = self.ledger.of(lane.mailbox)
            usage.route = route_name
            now = self.clock()
            count = len(queued.to_try())
            decision = pacing.decide(usage, limits, count, now)
            if isinstance(decision, pacing.WaitRate):
                lane.waiting.append(queued.id)
                self._arm(key, lane, decision.until - now)
                return False
            if isinstance(decision, pacing.WaitBudget):
                self._wait_for_budget(queued, agent.route, lane.mailbox, decision)
                self._drop_lane_if_idle(key, lane)
                return False
            if isinstance(decision, pacing.TooMany):
                reply = pacing.too_many_reply(lane.mailbox, route_name, decision,
                                              self.ledger.window_s)
                self._finish_unsent(queued, agent.route, Report(
                    {r: RecipientResult(Status.FAILED, reply) for r in queued.to_try()}))
                self._drop_lane_if_idle(key, lane)
                return False
            reserved = pacing.take(usage, limits, count, now)
            if reserved:
                self._reserved[queued.id] = (lane.mailbox, reserved)
            if lane.waiting and limits.rate is not None:
                self._arm(key, lane, usage.next_slot - now)  # the next one's slot
        lane.busy += 1
        queued.lane = key
        return True

    def limits_of(self, route: RouteConfig) -> pacing.Limits:
        cached = self._limits.get(route.name)
        if cached is None or cached[0] is not route:
            cached = self._limits[route.name] = (route, pacing.limits_for(route))
        return cached[1]

    def _arm(self, key: tuple[str, str], lane: _Lane, delay: float) -> None:
        """Wake the lane when its mailbox's next rate slot comes."""
        if lane.timer is None:
            lane.timer = asyncio.get_running_loop().call_later(max(0.0, delay),
                                                               self._lane_due, key)

    def _lane_due(self, key: tuple[str, str]) -> None:
        lane = self._lanes.get(key)
        if lane is None:
            return
        lane.timer = None
        self._release_lane(key, lane)
        self._pump(key[0])

    def _release_lane(self, key: tuple[str, str], lane: _Lane) -> None:
        """The lane's next waiting messages go to the head of the route's due messages, as
        many as it has places and rate slots (they are pumped right after)."""
        places = lane.limit - lane.busy if lane.limit else len(lane.waiting)
        if lane.limits is not None and lane.limits.rate is not None and lane.waiting:
            usage = self.ledger.of(lane.mailbox)
            wait = usage.next_slot - self.clock()
            if wait > 0:
                self._arm(key, lane, wait)
                places = 0
            else:
                places = min(places, 1)
        front: list[str] = []
        while lane.waiting and len(front) < places:
            qid = lane.waiting.popleft()
            waiting = self._messages.get(qid)
            if waiting is not None and waiting.state == DUE:  # not deleted or deferred since
                front.append(qid)
        if front:
            self._due.setdefault(key[0], collections.deque()).extendleft(reversed(front))
        else:
            self._drop_lane_if_idle(key, lane)

    def _drop_lane_if_idle(self, key: tuple[str, str], lane: _Lane) -> None:
        if lane.busy == 0 and not lane.waiting and self._lanes.get(key) is lane:
            if lane.timer is not None:
                lane.timer.cancel()
            del self._lanes[key]

    def _leave_lane(self, queued: Queued) -> None:
        """An attempt is over: its lane's next waiting messages may go."""
        key, queued.lane = queued.lane, None
        lane = self._lanes.get(key) if key is not None else None
        if key is None or lane is None:
            return
        lane.busy -= 1
        self._release_lane(key, lane)

    def _settle_usage(self, queued: Queued, agent: DeliveryAgent, report: Report) -> None:
        """The attempt's recipients count against its mailbox's budget once delivered; a
        reply that says the mailbox is blocked for sending is kept for [notify]."""
        held = self._reserved.pop(queued.id, None)
        if held is not None:
            delivered = sum(1 for r in report.results.values() if r.status is Status.DELIVERED)
            self.ledger.settle(held[0], held[1], delivered, self.clock())
        for result in report.results.values():
            if result.status is not Status.DELIVERED and pacing.is_blocked(result.reply):
                entry = queued.entry
                mailbox = agent.upstream.sending_mailbox(entry.sender, entry.recipients) or "?"
                self.blocked[mailbox.lower()] = (agent.route.name, self.clock(),
                                                 result.reply.one_line())
                break

    def _wait_for_budget(self, queued: Queued, route: RouteConfig, mailbox: str,
                         wait: pacing.WaitBudget) -> None:
        """Over its mailbox's budget: deferred until the budget frees, with no try counted;
        the reason is saved, so `relayd queue list` and `show` say it."""
        entry = queued.entry
        text = pacing.wait_text(mailbox, route.name, wait, self.ledger.window_s)
        entry.last_error = text
        for rcpt in queued.to_try():
            state = entry.rcpt[rcpt]
            state.code, state.text = None, text
        entry.next_attempt = wait.until
        self._budget_waits[queued.id] = mailbox
        self._release(queued)
        queued.state = ACTIVE  # until its state is saved
        self._active += 1
        self._idle.clear()
        self._spawn(self._budget_wait(queued, route, wait.until, text), f"wait-{entry.id}")

    async def _budget_wait(self, queued: Queued, route: RouteConfig, until: float,
                           text: str) -> None:
        entry = queued.entry
        try:
            log.info("%s: deferred via %s: %s", entry.id, route.name, text)
            self._record("deferred", queued, route, queued.to_try(), reply=text,
                         next_try=until)
            await self._save_state(entry)
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()
            if queued.deleted:
                self._forget(queued, "deleted by the admin")
            elif queued.id in self._messages:
                self._defer(queued, until)

    def _finish_unsent(self, queued: Queued, route: RouteConfig | None, report: Report) -> None:
        """Decide on a report made here, with no attempt (no route, more recipients than the
        mailbox may ever send to at once)."""
        queued.state = ACTIVE
        self._active += 1
        self._idle.clear()
        self._spawn(self._settle(queued, route, report, time.monotonic()),
                    f"settle-{queued.id}")

    def mailbox_use(self) -> list[pacing.MailboxUse]:
        """Each busy sending mailbox (recipients counted, or messages waiting for it): for the
        status page, the metrics and [notify]."""
        now = self.clock()
        waiting: dict[tuple[str, str], int] = {}
        for (route_name, mailbox), lane in self._lanes.items():
            if lane.waiting:
                waiting[(route_name, mailbox)] = len(lane.waiting)
        for qid, mailbox in self._budget_waits.items():
            queued = self._messages.get(qid)
            route = self.route_for(queued.entry) if queued is not None and \
                queued.state == DEFERRED else None
            if route is not None:
                key = (route.name, mailbox)
                waiting[key] = waiting.get(key, 0) + 1
        keys = set(waiting)
        for mailbox, usage in self.ledger.usage.items():
            if usage.route and usage.used(now):
                keys.add((usage.route, mailbox))
        out = []
        for route_name, mailbox in sorted(keys):
            config = self.config.routes.get(route_name)
            if config is None:
                continue
            limits = self.limits_of(config)
            counted = self.ledger.usage.get(mailbox)
            used = counted.used(now) if counted is not None else 0
            frees = counted.frees_at(1, used, now) if counted is not None and used else None
            out.append(pacing.MailboxUse(route_name, mailbox, used, limits.daily_recipients,
                                         limits.rate, frees,
                                         waiting.get((route_name, mailbox), 0)))
        return out

    def _load_usage(self) -> None:
        try:
            data = self.spool.read_usage()
            if data is not None:
                self.ledger.load(data, self.clock())
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warning("queue: cannot read the mailboxes' counts (%s); each mailbox's daily "
                        "budget starts again from zero", e)

    def _save_usage(self, force: bool = False) -> None:
        """Hand the changed counts to the spool's writer (at most every SAVE_EVERY_S)."""
        if not self.ledger.dirty:
            return
        if not force and time.monotonic() - self._usage_saved < pacing.SAVE_EVERY_S:
            return
        self._usage_saved = time.monotonic()
        self.ledger.dirty = False
        try:
            self.spool.save_usage(self.ledger.to_json(self.clock()))
        except OSError as e:
            log.warning("queue: cannot save the mailboxes' counts: %s", e)
