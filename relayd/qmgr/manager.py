"""The queue manager: the one owner of every queued message's delivery state.

Each message is due (waiting for its route's agent to have a free session), active (a job is
with the agent), deferred (waiting for its next try, or for its route's hold to end) or gone.
Nothing else changes that state: the listener hands accepted messages in with `submit`, the
delivery agents return reports, `relayd queue retry|delete` arrive as control requests, and the
decision after each attempt is `relayd.qmgr.outcome.decide`, a pure function.

At most a route's `max_connections` attempts are out at once (counted here, per route), and
each sending mailbox is a lane of its route: no more of its attempts at once than its upstream
allows (Graph: 4), and no more messages or recipients than its rate and daily budget allow
(relayd.qmgr.pacing decides; a message over the rate waits in its lane, one over the budget is
deferred with the reason, one over the whole budget fails). While a route is held (its
upstream found unreachable) its due messages wait for the hold's end
without an attempt and without their bytes in memory. A held report changes nothing on disk (no
try counted, no recipient's status changed), so it is not written: with 100,000 queued and the
upstream down, those writes were most of relayd's time.

After a decision the manager carries it out in a fixed order, so that a crash at any point
loses nothing: (1) store the bounce for new failures (durably; its envelope names the message
and recipients it reports), (2) record the recipients' new state, (3) remove the message once
nothing is pending, (4) hand the bounce on for delivery. A bounce that cannot be stored leaves
the failure unrecorded and the message where it is, to be tried again after `retry_min`; a
bounce that cannot be built at all moves the message to corrupt/ with the reason. Every removal
is one log line naming the queue id and why.

The hand-over from a listener is a hint, not the only way in (Postfix's qmgr scans its
incoming queue on a timer for the same reason): every SCAN_INTERVAL_S the manager lists msg/
and takes every entry it does not know whose file is at least SCAN_MIN_AGE_S old (a listener
worker killed between its fsync and its report, a report this process could not read), and
`queue retry --all` scans first. Ids reported but unreadable for a moment (out of descriptors)
are tried again every CONTROL_POLL_S. Nothing is scheduled twice: an id is taken only if it is
not in `messages`, on the event loop, and never if this process removed it lately (its file may
linger for a moment; `Spool.unknown`). At 100,000 queued a scan is one listing of msg/ and a set
lookup per name, on a thread (bench/scan.py). Rejected: scanning only at start (a lost report
waited for a restart) and an inotify watch (not on every platform relayd runs on).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import heapq
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from relayd import crashpoint
from relayd.bounce import Failure, build_bounce
from relayd.config import Config, RouteConfig
from relayd.delivery import STREAMING_UPSTREAMS, RecipientResult, SpooledBody, Status, Upstream
from relayd.delivery.agent import DeliveryAgent, Job, Report
from relayd.delivery.doubt import DUPLICATE_RISK, INTERRUPTED
from relayd.errors import QueueError, SpoolBusyError
from relayd.journal import Journal
from relayd.qmgr import pacing
from relayd.qmgr.outcome import Attempted, Outcome, Policy, decide
from relayd.qmgr.view import QueueView
from relayd.queue import DELIVERED, FAILED, Entry, RecipientState, Spool
from relayd.reply import Reply
from relayd.router import Router

log = logging.getLogger(__name__)

CONTROL_POLL_S = 0.5
MEMORY_HOLD_BYTES = 64 * 1024 * 1024  # fresh messages kept in memory for their first attempt
INLINE_READ_MAX_BYTES = 256 * 1024  # spool files up to this size are read on the event loop
CONTROL_ERROR_LOG_S = 60.0
BOUNCE_HEAD_BYTES = 256 * 1024  # a large message's bounce reads this much of it at most
RETIRE_TIMEOUT_S = 300.0  # an agent replaced by a reload finishes its jobs within this
SCAN_INTERVAL_S = 15.0  # msg/ is scanned for entries nobody scheduled this often
SCAN_MIN_AGE_S = 5.0  # ... that were last written at least this long ago
SCAN_ERROR_LOG_S = 60.0
SCAN_LOG_IDS = 10  # ids named in the scan's log line
USAGE_PRUNE_S = 60.0  # mailboxes with nothing counted are forgotten this often
BLOCKED_KEEP_S = 7 * 86400.0  # a mailbox's "blocked for sending" reply is kept this long

DUE = "due"
ACTIVE = "active"
DEFERRED = "deferred"


class Observer(Protocol):
    """What the queue manager reports (metrics); every method must be cheap and never raise."""

    def delivered(self, route: str) -> None: ...
    def deferred(self, route: str) -> None: ...
    def bounced(self, route: str) -> None: ...
    def observe_latency(self, route: str, seconds: float) -> None: ...
    def in_doubt(self, route: str, lookup: bool) -> None: ...


class NullObserver:
    def delivered(self, route: str) -> None:
        pass

    def deferred(self, route: str) -> None:
        pass

    def bounced(self, route: str) -> None:
        pass

    def observe_latency(self, route: str, seconds: float) -> None:
        pass

    def in_doubt(self, route: str, lookup: bool) -> None:
        pass


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


UpstreamFactory = Callable[[RouteConfig, Config], Upstream]


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


class QueueManager:
    def __init__(self, config: Config, spool: Spool, upstream_factory: UpstreamFactory,
                 observer: Observer | None = None,
                 clock: Callable[[], float] = time.time, router: Router | None = None,
                 journal: Journal | None = None,
                 on_bounce: Callable[[Entry, Entry], None] | None = None) -> None:
        self.config = config
        self.on_bounce = on_bounce  # (original, bounce) once a bounce is stored: [notify]
        self.spool = spool
        self.make_upstream = upstream_factory
        self.observer: Observer = observer or NullObserver()
        self.clock = clock
        self.router = router or Router(config.routes)  # the sender policy's, in a service
        self.journal = journal
        self.messages: dict[str, Queued] = {}
        self.agents: dict[str, DeliveryAgent] = {}
        self._due: dict[str, collections.deque[str]] = {}
        # (when, qid); an item is current while its message is deferred until exactly `when`
        self._heap: list[tuple[float, str]] = []
        self._hold_texts: dict[str, tuple[Reply, str]] = {}  # route -> its hold's last_error
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._held_bytes = 0
        self._inflight: dict[str, int] = {}  # route name -> attempts handed out, not yet done
        self._lanes: dict[tuple[str, str], _Lane] = {}  # (route, lane key) -> its attempts
        self._control_error_at = -CONTROL_ERROR_LOG_S
        self._scan_error_at = -SCAN_ERROR_LOG_S
        self._last_scan = time.monotonic()  # the first scan comes one interval after start
        self._unread: set[str] = set()  # reported, but could not be read yet (temporary)
        self.on_found: Callable[[Entry], None] | None = None  # a found entry: count it
        self._deleted_by: dict[str, str] = {}  # qid -> admin, a delete asked while active
        self.view = QueueView(self)  # the read side: status page, console, notify, metrics
        self.ledger = pacing.Ledger()  # each sending mailbox's recent recipients (pacing)
        self._limits: dict[str, tuple[RouteConfig, pacing.Limits]] = {}  # per route
        self._reserved: dict[str, tuple[str, int]] = {}  # qid -> (mailbox, recipients)
        self._budget_waits: dict[str, str] = {}  # qid -> the mailbox whose budget it waits for
        self.blocked: dict[str, tuple[str, float, str]] = {}  # mailbox -> (route, when, reply)
        self._usage_saved = 0.0  # monotonic
        self._usage_pruned = 0.0  # monotonic
        self._load_usage()

    # -- policy --------------------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        q = self.config.queue
        return Policy(q.retry_min_s, q.retry_max_s, q.max_age_s)

    def route_for(self, entry: Entry) -> RouteConfig | None:
        if entry.route is not None:
            return self.config.routes.get(entry.route)
        return self.router.lookup(entry.sender)

    def agent_for(self, route: RouteConfig) -> DeliveryAgent:
        agent = self.agents.get(route.name)
        # `is` first: the dataclass __eq__ compares every field of the route, every attempt.
        if agent is None or (agent.route is not route and agent.route != route):
            if agent is not None:
                self._retire(agent)
            agent = DeliveryAgent(route, self.make_upstream(route, self.config),
                                  hold_s=self.config.queue.retry_min_s)
            self.agents[route.name] = agent
        return agent

    def _retire(self, agent: DeliveryAgent) -> None:
        self._spawn(agent.close(timeout=RETIRE_TIMEOUT_S), f"retire-{agent.route.name}")

    def reload(self, config: Config, router: Router | None = None) -> None:
        """New routes apply from the next attempt; jobs in flight finish on the old agents,
        which are then closed."""
        self.config = config
        self.router = router or Router(config.routes)
        for name, agent in list(self.agents.items()):
            if config.routes.get(name) != agent.route:
                del self.agents[name]
                self._retire(agent)
        for name in list(self._due):
            self._pump(name)
        self._wake.set()

    # -- intake --------------------------------------------------------------------------------

    def has(self, queue_id: str) -> bool:
        return queue_id in self.messages

    def submit(self, entry: Entry, data: bytes | None = None) -> None:
        """A message just accepted (with its bytes) or recovered: deliver it when it is due."""
        if entry.id in self.messages:
            return
        queued = Queued(entry)
        if data is not None and self._held_bytes + len(data) <= MEMORY_HOLD_BYTES:
            queued.data = data
            self._held_bytes += len(data)
        self.messages[entry.id] = queued
        if entry.next_attempt <= self.clock():
            self._make_due(queued)
        else:
            self._defer(queued, entry.next_attempt)

    def recover(self, entries: list[Entry]) -> None:
        """After a restart: bounces already stored tell which failures they report, even when
        the crash came before those failures were recorded."""
        self.mark_bounced(entries)
        self.take_recovered(entries)

    @staticmethod
    def mark_bounced(entries: list[Entry]) -> None:
        """Record as failed the recipients that a stored bounce among `entries` reports (a
        crash between storing a bounce and recording its failures), before any is submitted."""
        bounces = [e for e in entries if e.bounce_for is not None]
        if not bounces:
            return
        by_id = {e.id: e for e in entries}
        for bounce in bounces:
            original = by_id.get(bounce.bounce_for or "")
            if original is None:
                continue
            for rcpt in bounce.bounce_rcpts:
                state = original.rcpt.get(rcpt)
                if state is not None and state.status not in (DELIVERED, FAILED):
                    original.rcpt[rcpt] = RecipientState(FAILED, None,
                                                         f"bounced in {bounce.id}")

    def take_recovered(self, entries: list[Entry]) -> None:
        """Queue entries read from the spool at start (after `mark_bounced` on all of them). An
        id the manager already has is its own, live copy and is left alone."""
        for entry in entries:
            if entry.id in self.messages:
                continue
            if entry.pending():
                self.submit(entry)
            else:
                self._remove(entry, "every recipient was finished before the restart")

    def read_later(self, queue_id: str) -> None:
        """A reported id whose entry could not be read for now (SpoolBusyError): tried again
        every CONTROL_POLL_S, and in any case found by the next scan."""
        self._unread.add(queue_id)
        self._wake.set()

    async def scan(self, *, everything: bool = True) -> int:
        """Take the entries of msg/ this manager does not know (see the module docstring);
        with `everything` False, only the reported ids that could not be read. Returns how
        many were queued."""
        loop_ids = sorted(self._unread)
        self._unread.clear()
        found: list[Entry] = []
        busy: list[str] = []

        def read() -> None:
            ids = loop_ids
            if everything:
                ids = sorted(set(ids) | set(self.spool.unknown(self.messages, SCAN_MIN_AGE_S)))
            for qid in ids:
                if qid in self.messages:
                    continue
                try:
                    found.append(self.spool.load(qid))
                except SpoolBusyError:
                    busy.append(qid)
                except QueueError as e:
                    if "no message" in str(e):
                        continue
                    log.error("queue: %s; moved to %s", e, self.spool.corrupt_dir)
                    self.spool.quarantine(qid, str(e))

        try:
            await asyncio.to_thread(read)
        except OSError as e:
            busy = loop_ids
            self._scan_failed(e)
        self._unread.update(busy)
        # On the event loop: one last check against what arrived meanwhile.
        taken = [e for e in found
                 if e.id not in self.messages and not self.spool.removed_lately(e.id)]
        if not taken:
            return 0
        ids = [e.id for e in taken]
        log.warning("queue: %d message(s) in %s were not scheduled (a lost or unreadable "
                    "report); queued now: %s%s", len(ids), self.spool.msg_dir,
                    ", ".join(ids[:SCAN_LOG_IDS]), " ..." if len(ids) > SCAN_LOG_IDS else "")
        for entry in taken:
            if self.on_found is not None and entry.pending():
                self.on_found(entry)
        self.take_recovered(taken)
        return len(taken)

    def _scan_failed(self, e: OSError) -> None:
        now = time.monotonic()
        if now - self._scan_error_at >= SCAN_ERROR_LOG_S:
            self._scan_error_at = now
            log.warning("queue: cannot scan %s yet: %s (tried again in %ds)",
                        self.spool.msg_dir, e, SCAN_INTERVAL_S)

    def _release(self, queued: Queued) -> None:
        if queued.data is not None:
            self._held_bytes -= len(queued.data)
            queued.data = None

    def _defer(self, queued: Queued, when: float) -> None:
        queued.state = DEFERRED
        queued.entry.next_attempt = when
        heapq.heappush(self._heap, (when, queued.id))
        self._wake.set()

    def _make_due(self, queued: Queued) -> None:
        route = self.route_for(queued.entry)
        if route is None:
            self._no_route(queued)
            return
        agent = self.agent_for(route)
        held = agent.held_s()
        if held is not None and not queued.unbounced:
            self._wait_for_hold(queued, agent, held)
            return
        queued.state = DUE
        self._due.setdefault(route.name, collections.deque()).append(queued.id)
        self._pump(route.name)

    def _wait_for_hold(self, queued: Queued, agent: DeliveryAgent, held: float) -> None:
        """The route's upstream was unreachable moments ago: wait for the hold to end, with no
        attempt and no try counted, and without its bytes in memory meanwhile."""
        reply = agent.hold_reply
        if reply is not None:
            said = self._hold_texts.get(agent.route.name)
            if said is None or said[0] is not reply:  # one string for all it holds
                said = self._hold_texts[agent.route.name] = (reply, f"route held: {reply}")
            queued.entry.last_error = said[1]
        self._release(queued)
        self._defer(queued, self.clock() + held)

    def _pump(self, route_name: str) -> None:
        """Hand due messages to the route's agent while it has a free session.

        The manager counts the attempts it has handed out per route (the agent's `busy` only
        rises once an attempt's task runs, so counting that would start one task per due
        message at once: 100,000 after a restart, each reading its bytes). While the route is
        held, due messages wait for the hold's end without an attempt (unless a failure of
        theirs still needs its bounce stored, which is the attempt's work)."""
        if self._stopping:
            return
        due = self._due.get(route_name)
        route = self.config.routes.get(route_name)
        if not due or route is None:
            return
        agent = self.agent_for(route)
        inflight = self._inflight.get(route_name, 0)
        while due:
            held = agent.held_s()
            free = inflight < route.max_connections and agent.has_capacity()
            if held is None and not free:
                break
            qid = due.popleft()
            queued = self.messages.get(qid)
            if queued is None or queued.state != DUE:
                continue
            if held is not None and not queued.unbounced:
                self._wait_for_hold(queued, agent, held)
                continue
            if not free:
                due.appendleft(qid)
                break
            if not self._enter_lane(queued, route_name, agent):
                continue  # its lane is full: it waits there, and the next message goes
            queued.state = ACTIVE
            inflight += 1
            self._active += 1
            self._idle.clear()
            self._spawn(self._attempt(queued, agent), f"attempt-{queued.id}")
        self._inflight[route_name] = inflight
        if not due:
            del self._due[route_name]

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
            waiting = self.messages.get(qid)
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
            elif queued.id in self.messages:
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
            queued = self.messages.get(qid)
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

    def _no_route(self, queued: Queued) -> None:
        """The config changed under a queued message: keep it and keep trying, never drop it."""
        entry = queued.entry
        why = (f"route {entry.route!r} no longer exists" if entry.route
               else f"no route for sender <{entry.sender}> in the current config")
        log.warning("%s: deferred: %s", entry.id, why)
        reply = Reply.local(why, "4.3.5")
        self._finish_unsent(queued, None, Report(
            {r: RecipientResult(Status.DEFERRED, reply) for r in queued.to_try()}))

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the journal ---------------------------------------------------------------------------

    def _record(self, event: str, queued: Queued, route: RouteConfig | None,
                recipients: list[str], **fields: Any) -> None:
        if self.journal is None:
            return
        entry = queued.entry
        self.journal.record(event, entry.id, message_id=entry.message_id,
                            **{"from": entry.sender}, to=recipients,
                            route=route.name if route else entry.route,
                            upstream=route.upstream_name if route else "",
                            bounce_for=entry.bounce_for,
                            **fields)

    def _record_grouped(self, event: str, queued: Queued, route: RouteConfig | None,
                        replies: dict[str, Reply], **fields: Any) -> None:
        """One event per distinct reply (recipients refused alike share one line)."""
        groups: dict[str, list[str]] = {}
        for rcpt, reply in replies.items():
            groups.setdefault(str(reply), []).append(rcpt)
        for said, rcpts in groups.items():
            self._record(event, queued, route, rcpts, reply=said, **fields)

    # -- attempts ------------------------------------------------------------------------------

    async def _read(self, entry: Entry) -> bytes:
        """A message's bytes from the spool; small ones inline (a page-cache read costs less
        than the thread hop), large ones on a thread so the loop never stalls on them."""
        if entry.size <= INLINE_READ_MAX_BYTES:
            return self.spool.read_data(entry)
        return await asyncio.to_thread(self.spool.read_data, entry)

    async def _read_head(self, entry: Entry) -> bytes:
        """What a bounce quotes of a message: its header section (bounce.py attaches no
        more), so a 34 MB message that bounces is not read whole into memory. Headers longer
        than BOUNCE_HEAD_BYTES end at the last whole line within them."""
        if entry.size <= BOUNCE_HEAD_BYTES:
            return await self._read(entry)
        head = await asyncio.to_thread(self.spool.read_data, entry, BOUNCE_HEAD_BYTES)
        end = head.find(b"\r\n\r\n")
        return head[:end + 4] if end >= 0 else head[:head.rfind(b"\r\n") + 2]

    async def _attempt(self, queued: Queued, agent: DeliveryAgent) -> None:
        entry = queued.entry
        started = time.monotonic()
        report = Report()
        recipients = queued.to_try()
        try:
            if recipients and not queued.deleted:
                data = queued.data
                spooled = None
                streams = agent.route.upstream in STREAMING_UPSTREAMS
                if data is None and streams and entry.size > INLINE_READ_MAX_BYTES:
                    # Sent from its file in chunks: memory does not grow with message size.
                    data = b""
                    spooled = SpooledBody(self.spool.data_path(entry), entry.data_offset,
                                          entry.size)
                    if not spooled.path.exists():
                        self._forget(queued, "its file vanished from the spool (removed by "
                                     "hand?)")
                        return
                if data is None:
                    try:
                        data = await self._read(entry)
                    except FileNotFoundError:
                        self._forget(queued, "its file vanished from the spool (removed by "
                                     "hand?)")
                        return
                    except OSError as e:
                        unreadable = Reply.local(f"cannot read the message from the spool: "
                                                 f"{e.strerror or e}", "4.3.0")
                        await self._settle(queued, agent.route, Report(
                            {r: RecipientResult(Status.DEFERRED, unreadable)
                             for r in recipients}), started)
                        return
                route = agent.route
                check_since = None
                doubt, doubt_at = "", None
                if route.dedupe and route.upstream in ("ews", "graph"):
                    if entry.started:
                        # An attempt was under way when relayd stopped, or its answer was
                        # lost (relayd.delivery.doubt): did it go out?
                        check_since = entry.received
                        doubt = entry.doubt or INTERRUPTED
                        doubt_at = entry.doubt_at or None
                    # Durably "started" before sending, so a crash mid-send is known after.
                    entry.started = entry.attempts + 1
                    await self._save_state(entry)
                job = Job(entry.id, entry.sender, recipients, data, entry.mail_options,
                          entry.attempts + 1, check_since, spooled, doubt=doubt,
                          doubt_at=doubt_at)
                report = await agent.deliver(job)
                self.observer.observe_latency(agent.route.name, time.monotonic() - started)
                crashpoint.reached("reported")
            await self._settle(queued, agent.route, report, started)
        finally:
            name = agent.route.name
            self._inflight[name] = max(0, self._inflight.get(name, 0) - 1)
            self._settle_usage(queued, agent, report)
            self._leave_lane(queued)
            self._pump(name)

    async def _settle(self, queued: Queued, route: RouteConfig | None, report: Report,
                      started: float) -> None:
        """Decide, then carry the decision out. Always leaves the message deferred, removed or
        quarantined, and never active."""
        try:
            await self._carry_out(queued, route, report, time.monotonic() - started)
        except Exception:
            # A bug, not a disk problem (those are handled where they happen): keep the message
            # and try again later; on disk it is still the previous state, so nothing is lost.
            log.exception("%s: cannot record the attempt's outcome; next try in %ds", queued.id,
                          self.config.queue.retry_min_s)
            if queued.id in self.messages:
                self._defer(queued, self.clock() + self.config.queue.retry_min_s)
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    async def _carry_out(self, queued: Queued, route: RouteConfig | None,
                         report: Report, latency_s: float) -> None:
        entry = queued.entry
        route_name = route.name if route else (entry.route or "-")
        now = self.clock()
        if queued.deleted:
            self._forget(queued, "deleted by the admin")
            return
        recipients = queued.to_try()
        outcome = decide(Attempted(recipients, entry.received, entry.backoff, entry.is_bounce,
                                   queued.last_reply), report, now, self.policy)
        was_started, entry.started = entry.started, 0  # the attempt is reported; saved below
        earlier_doubt = entry.doubt
        doubt_note = self._note_doubt(entry, route, route_name, report, was_started,
                                      outcome.tried)
        self._apply(queued, route_name, outcome)
        self._journal_outcome(queued, route, outcome, round(latency_s, 3),
                              "found-in-sent-items" if report.found_in_sent else "delivered",
                              doubt=report.doubt if outcome.tried else "",
                              earlier_doubt=earlier_doubt if report.found_in_sent else "",
                              may_duplicate=bool(report.doubt) and not entry.started)
        bounce: Entry | None = None
        if queued.unbounced:
            if entry.is_bounce:
                # Never bounce a bounce: say it loudly instead.
                log.error("%s: bounce to <%s> could not be delivered and is dropped: %s",
                          entry.id, ", ".join(queued.unbounced),
                          "; ".join(str(f.reply) for f in queued.unbounced.values()))
                self._record_failed(queued)
            else:
                stored = await self._store_bounce(queued, route_name)
                if stored is None:
                    self._log_delivered(entry.id, route_name, _by_reply(outcome.delivered))
                    if queued.id in self.messages:  # kept for the bounce, not quarantined
                        await self._save_state(entry)
                    return
                bounce = stored
                crashpoint.reached("bounce-stored")
        self._release(queued)
        delivered = _by_reply(outcome.delivered)
        if not entry.pending():
            crashpoint.reached("before-removal")
            if len(delivered) == 1 and not outcome.failed and bounce is None and \
                    len(outcome.delivered) == len(entry.rcpt):
                # The common case in one line, not two: delivered to all, and so removed.
                [(said, rcpts)] = delivered.items()
                self.spool.remove(entry.id, has_state=entry.has_state, size=entry.file_size)
                log.info("%s: delivered to %s via %s: %s; removed from the queue", entry.id,
                         rcpts, route_name, said)
            else:
                self._log_delivered(entry.id, route_name, delivered)
                self._remove(entry, self._why_done(queued, outcome, bounce))
            self.messages.pop(entry.id, None)
        else:
            self._log_delivered(entry.id, route_name, delivered)
            assert outcome.next_attempt is not None
            entry.next_attempt = outcome.next_attempt
            if outcome.hints:  # what the reply means, in the queue too (`queue list`)
                entry.last_error += "".join(f" ({h})" for h in dict.fromkeys(outcome.hints))
            if outcome.tried or was_started or bounce is not None:
                await self._save_state(entry)
            # else the route was held and nothing was tried: no try counted, no backoff, no
            # recipient's status changed, so the state on disk still holds; only the next try's
            # time is new, and an older one on disk just means an earlier try after a crash.
            # (At 100,000 queued with the upstream down, these saves were 62 % of the time.)
            delay = max(0.0, outcome.next_attempt - now)
            why = entry.last_error + doubt_note
            if outcome.tried:
                log.info("%s: deferred for %d recipient(s) via %s, next try in %ds: %s",
                         entry.id, len(entry.pending()), route_name, delay, why)
                self.observer.deferred(route_name)
            self._defer(queued, outcome.next_attempt)
        if bounce is not None:
            self.submit(bounce)

    def _note_doubt(self, entry: Entry, route: RouteConfig | None, route_name: str,
                    report: Report, was_started: int, tried: bool) -> str:
        """An attempt whose answer was lost (relayd.delivery.doubt). On a dedupe route the
        message stays "started", as after a crash, so the next attempt looks in Sent Items
        first; elsewhere the resend may duplicate. Counted either way; returns what the
        deferral's log line adds."""
        if not report.doubt:
            entry.doubt, entry.doubt_at = "", 0.0
            return ""
        lookup = route is not None and route.dedupe and route.upstream in ("ews", "graph")
        if tried:
            self.observer.in_doubt(route_name, lookup)
        if not lookup:
            entry.doubt, entry.doubt_at = "", 0.0
            if DUPLICATE_RISK in report.doubt:
                return ""  # the reply says so already
            return f" (in doubt: {DUPLICATE_RISK})"
        entry.started = was_started or entry.attempts + 1
        if tried:  # a new doubt (a held route tried nothing: the old one stands)
            entry.doubt_at = time.time()
        entry.doubt = report.doubt
        return " (in doubt: the next attempt looks in Sent Items first)"

    def _apply(self, queued: Queued, route_name: str, outcome: Outcome) -> None:
        """The decision, in memory; failures wait in `unbounced` until their bounce is stored."""
        entry = queued.entry
        for rcpt, reply in outcome.delivered.items():
            entry.rcpt[rcpt] = RecipientState(DELIVERED, reply.smtp_code, _words(reply))
            self.observer.delivered(route_name)
        for rcpt, failed in outcome.failed.items():
            queued.failed(rcpt, Failure(rcpt, failed.reply, failed.status))
            what = "expired" if outcome.expired and failed.status == "4.4.7" else "failed"
            log.info("%s: %s for <%s> via %s: %s", entry.id, what, rcpt, route_name,
                     failed.reply)
        for rcpt, reply in outcome.pending.items():
            state = entry.rcpt[rcpt]
            state.code, state.text = reply.smtp_code, _words(reply)
            queued.replied(rcpt, reply)
            entry.last_error = str(reply)
        if outcome.tried and (outcome.delivered or outcome.failed or outcome.pending):
            entry.attempts += 1
        entry.backoff = outcome.backoff

    @staticmethod
    def _log_delivered(qid: str, route_name: str, delivered: dict[str, str]) -> None:
        for said, rcpts in delivered.items():
            log.info("%s: delivered to %s via %s: %s", qid, rcpts, route_name, said)

    def _journal_outcome(self, queued: Queued, route: RouteConfig | None, outcome: Outcome,
                         latency_s: float, delivered: str, *, doubt: str = "",
                         earlier_doubt: str = "", may_duplicate: bool = False) -> None:
        """`doubt`: this attempt's answer was lost; `earlier_doubt`: the doubt a lookup in
        Sent Items settled (found-in-sent-items)."""
        if self.journal is None or not outcome.tried:
            return
        attempt = queued.entry.attempts
        self._record_grouped(delivered, queued, route, outcome.delivered, attempt=attempt,
                             latency_s=latency_s, doubt=earlier_doubt)
        failed = {r: f.reply for r, f in outcome.failed.items()}
        self._record_grouped("expired" if outcome.expired else "failed", queued, route, failed,
                             attempt=attempt, latency_s=latency_s)
        self._record_grouped("deferred", queued, route, outcome.pending, attempt=attempt,
                             latency_s=latency_s, next_try=outcome.next_attempt, doubt=doubt,
                             may_duplicate=may_duplicate or None)

    def _record_failed(self, queued: Queued) -> None:
        for rcpt, failure in queued.unbounced.items():
            queued.entry.rcpt[rcpt] = RecipientState(FAILED, failure.reply.smtp_code,
                                                     _words(failure.reply))
        queued.unbounced = _NO_FAILURES

    async def _store_bounce(self, queued: Queued, route_name: str) -> Entry | None:
        """Build and store the bounce for the failures waiting for one. On success the failures
        are recorded in memory and the stored bounce returned; otherwise the message is kept
        (deferred) or, if no bounce can ever be built, quarantined; None then."""
        entry = queued.entry
        failures = list(queued.unbounced.values())
        try:
            original = queued.data if queued.data is not None else await self._read_head(entry)
            data = build_bounce(original=original, sender=entry.sender, failures=failures,
                                hostname=self.config.server.hostname, route=route_name,
                                queue_id=entry.id, arrival=entry.received)
        except OSError as e:
            self._keep_for_bounce(queued, f"cannot read the message: {e}")
            return None
        except Exception as e:  # noqa: BLE001 - whatever the email package raises
            why = f"cannot build a bounce for it: {type(e).__name__}: {e}"
            log.error("%s: moved to %s: %s", entry.id, self.spool.corrupt_dir, why)
            self._release(queued)
            self.spool.removing(entry.id)  # before it leaves `messages`: the scan skips it
            self.messages.pop(entry.id, None)
            await asyncio.to_thread(self.spool.quarantine, entry.id, why)
            return None
        pinned = route_name if route_name in self.config.routes else None
        try:
            bounce = await self.spool.accept("", [entry.sender], data, client="relayd",
                                             route=pinned,
                                             bounce_for=(entry.id, list(queued.unbounced)))
        except (QueueError, OSError) as e:
            self._keep_for_bounce(queued, str(e))
            return None
        log.info("%s: bounce %s queued to <%s> for %d recipient(s)", entry.id, bounce.id,
                 entry.sender, len(failures))
        self._record("bounced", queued, self.config.routes.get(route_name),
                     list(queued.unbounced), bounce=bounce.id)
        self.observer.bounced(route_name)
        self._record_failed(queued)
        if self.on_bounce is not None:
            try:
                self.on_bounce(entry, bounce)
            except Exception:  # noqa: BLE001 - a hook must never undo a stored bounce
                log.exception("%s: the on_bounce hook failed", entry.id)
        return bounce

    def _keep_for_bounce(self, queued: Queued, why: str) -> None:
        retry = self.config.queue.retry_min_s
        log.warning("%s: cannot store the bounce for %d failed recipient(s) (%s); the message "
                    "stays in the queue and the bounce is tried again in %ds", queued.id,
                    len(queued.unbounced), why, retry)
        self._defer(queued, self.clock() + retry)

    async def _save_state(self, entry: Entry) -> None:
        try:
            await asyncio.to_thread(self.spool.save_state, entry)
        except OSError as e:
            # The previous state stays on disk: after a crash this attempt's deliveries may be
            # made again (at most twice), never lost. Failures are in their stored bounce.
            log.warning("%s: cannot save the delivery state: %s", entry.id, e)

    def _why_done(self, queued: Queued, outcome: Outcome, bounce: Entry | None) -> str:
        entry = queued.entry
        delivered = sum(1 for s in entry.rcpt.values() if s.status == DELIVERED)
        failed = len(entry.rcpt) - delivered
        if entry.is_bounce and failed:
            return "the bounce could not be delivered and was dropped (a bounce is never bounced)"
        parts = [f"{delivered} delivered"] if delivered else []
        if failed:
            what = "expired" if outcome.expired else "failed"
            parts.append(f"{failed} {what}" + (f", bounce {bounce.id}" if bounce else ""))
        return "done: " + ", ".join(parts)

    def _remove(self, entry: Entry, why: str) -> None:
        self.spool.remove(entry.id, has_state=entry.has_state, size=entry.file_size)
        log.info("%s: removed from the queue: %s", entry.id, why)

    def _forget(self, queued: Queued, why: str) -> None:
        admin = self._deleted_by.pop(queued.id, None)
        self._budget_waits.pop(queued.id, None)
        if why == "deleted by the admin":
            self._record("deleted", queued, self.route_for(queued.entry),
                         queued.entry.pending(), admin=admin)
        self._release(queued)
        self.messages.pop(queued.id, None)
        self._remove(queued.entry, why)

    # -- main loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Wake deferred messages and serve control requests until stopped."""
        last_control = 0.0
        while not self._stopping:
            now = self.clock()
            while self._heap and self._heap[0][0] <= now:
                when, qid = heapq.heappop(self._heap)
                queued = self.messages.get(qid)
                if queued is None or queued.state != DEFERRED or \
                        queued.entry.next_attempt != when:
                    continue  # stale: rescheduled, removed or already going
                self._make_due(queued)
            if time.monotonic() - last_control >= CONTROL_POLL_S:
                last_control = time.monotonic()
                self._save_usage()
                if last_control - self._usage_pruned >= USAGE_PRUNE_S:
                    self._usage_pruned = last_control
                    self.ledger.forget_idle(now)
                    for mailbox, (_, at, _) in list(self.blocked.items()):
                        if now - at > BLOCKED_KEEP_S:
                            del self.blocked[mailbox]
                await self._control()
                if time.monotonic() - self._last_scan >= SCAN_INTERVAL_S:
                    self._last_scan = time.monotonic()
                    await self.scan()
                elif self._unread:
                    await self.scan(everything=False)
            timeout = CONTROL_POLL_S
            if self._heap:
                timeout = max(0.0, min(timeout, self._heap[0][0] - self.clock()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _control(self) -> None:
        try:
            requests = await asyncio.to_thread(self.spool.take_requests)
        except OSError as e:
            # Polled twice a second: say so once a minute (EMFILE under a flood would
            # otherwise be two lines a second). Out of descriptors is the state the listener
            # already warns of (sessions hold them; they come back as sessions end), and the
            # requests wait in the directory meanwhile: a warning, naming what to raise.
            now = time.monotonic()
            if now - self._control_error_at >= CONTROL_ERROR_LOG_S:
                self._control_error_at = now
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    log.warning("queue: cannot read control requests yet: %s (raise "
                                "LimitNOFILE, or lower server.max_sessions)", e)
                else:
                    log.error("queue: cannot read control requests: %s", e)
            return
        if ("retry", "all") in requests:
            self._last_scan = time.monotonic()
            await self.scan()  # so that entries nobody scheduled are retried too
        for action, target in requests:
            ids = list(self.messages) if target == "all" else [target]
            if action == "retry" and target == "all":
                # One line for all of them, not one per message (100,000 lines at scale).
                log.info("queue: retry requested for all %d message(s)", len(ids))
                for agent in self.agents.values():
                    agent.release_hold()
            for qid in ids:
                queued = self.messages.get(qid)
                if queued is None:
                    continue
                if action == "retry":
                    self.retry(queued, release_route=target != "all", quiet=target == "all")
                elif action == "delete":
                    self.delete(queued)

    def retry(self, queued: Queued, *, release_route: bool = True, quiet: bool = False) -> None:
        """`relayd queue retry`: clear the backoff and the route's hold; try at once."""
        if not quiet:
            log.info("%s: retry requested", queued.id)
        queued.entry.backoff = 0
        if release_route:
            route = self.route_for(queued.entry)
            if route is not None and route.name in self.agents:
                self.agents[route.name].release_hold()
        if queued.state == DEFERRED:
            self._make_due(queued)

    def delete(self, queued: Queued) -> None:
        if queued.state == ACTIVE:
            queued.deleted = True  # removed when its attempt ends
            return
        self._forget(queued, "deleted by the admin")

    def retry_ids(self, ids: list[str], admin: str, route: str | None = None) -> int:
        """The web console's retry, by an admin: as `relayd queue retry` for each id still
        queued, journaled as `retry` naming the admin: one event a message, or, for all of a
        `route`'s messages, one event for the route (its queue id `*`, with the count: 100,000
        events at once would overrun the journal's queue). How many were queued."""
        done = 0
        if route is not None and route in self.agents:
            self.agents[route].release_hold()  # first, as `queue retry --all` does
        for qid in ids:
            queued = self.messages.get(qid)
            if queued is None:
                continue
            if route is None:
                self._record("retry", queued, self.route_for(queued.entry),
                             queued.entry.pending(), admin=admin)
            self.retry(queued, release_route=route is None, quiet=len(ids) > 1)
            done += 1
        if route is not None and self.journal is not None:
            self.journal.record("retry", "*", route=route, admin=admin, count=done)
        if len(ids) > 1 or route is not None:
            log.info("queue: retry requested by %s for %d message(s)%s", admin, done,
                     f" of route {route}" if route else "")
        return done

    def delete_ids(self, ids: list[str], admin: str) -> int:
        """The web console's delete, by an admin: as `relayd queue delete`; the `deleted`
        journal event names the admin. How many were queued."""
        done = 0
        for qid in ids:
            queued = self.messages.get(qid)
            if queued is None:
                continue
            self._deleted_by[qid] = admin
            log.info("%s: delete requested by %s", qid, admin)
            self.delete(queued)
            done += 1
        return done

    def route_counts(self) -> dict[str, tuple[int, int, float | None]]:
        """Route name -> (messages queued, of which deferred, when the oldest deferred one was
        received), for the status page and [notify]. "-" holds messages without a route."""
        return {name: (c.queued, c.deferred, c.oldest_deferred)
                for name, c in self.view.route_counts().items()}

    def stats(self) -> tuple[int, float]:
        """Queue depth and the age in seconds of the oldest message."""
        return self.view.depth()

    async def drain(self, timeout: float) -> None:
        """Stop handing out jobs; let attempts in flight finish within `timeout`, then cancel."""
        self._stopping = True
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        self._save_usage(force=True)
        await asyncio.gather(*(a.close(timeout=1) for a in self.agents.values()),
                             return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)


def _by_reply(replies: dict[str, Reply]) -> dict[str, str]:
    """Reply text -> the recipients that got it, as `<a>, <b>` (one log line per reply)."""
    groups: dict[str, list[str]] = {}
    for rcpt, reply in replies.items():
        groups.setdefault(str(reply), []).append(rcpt)
    return {said: ", ".join(f"<{r}>" for r in rcpts) for said, rcpts in groups.items()}


def _words(reply: Reply) -> str:
    """A reply without its code, as the state file keeps it (the code is stored beside it)."""
    return f"{reply.enhanced} {reply.text}" if reply.enhanced else reply.text
