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

After a decision the manager carries it out in a fixed order that a crash at any point cannot
turn into a loss (relayd.qmgr.settle). Besides `submit`, messages come in through a periodic
scan of msg/ and control requests arrive from `relayd queue` and the web console
(relayd.qmgr.control). Each sending mailbox's lane and pacing is relayd.qmgr.lanes. What anyone
else sees of the queue is read through relayd.qmgr.view.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import relayd.qmgr.pacing as pacing
from relayd import crashpoint
from relayd.config import Config, RouteConfig
from relayd.delivery import STREAMING_UPSTREAMS, RecipientResult, SpooledBody, Status, Upstream
from relayd.delivery.agent import DeliveryAgent, Job, Report
from relayd.delivery.doubt import INTERRUPTED
from relayd.journal import Journal
from relayd.qmgr.control import (
    CONTROL_ERROR_LOG_S,
    CONTROL_POLL_S,
    SCAN_ERROR_LOG_S,
    SCAN_INTERVAL_S,
    Control,
)
from relayd.qmgr.lanes import Lanes, _Lane
from relayd.qmgr.observer import NullObserver, Observer
from relayd.qmgr.outcome import Policy
from relayd.qmgr.queued import ACTIVE, DEFERRED, DUE, Queued
from relayd.qmgr.settle import Settling
from relayd.qmgr.view import QueueView
from relayd.queue import DELIVERED, FAILED, Entry, RecipientState, Spool
from relayd.reply import Reply
from relayd.router import Router

log = logging.getLogger(__name__)

MEMORY_HOLD_BYTES = 64 * 1024 * 1024  # fresh messages kept in memory for their first attempt
INLINE_READ_MAX_BYTES = 256 * 1024  # spool files up to this size are read on the event loop
BOUNCE_HEAD_BYTES = 256 * 1024  # a large message's bounce reads this much of it at most
RETIRE_TIMEOUT_S = 300.0  # an agent replaced by a reload finishes its jobs within this
USAGE_PRUNE_S = 60.0  # mailboxes with nothing counted are forgotten this often
BLOCKED_KEEP_S = 7 * 86400.0  # a mailbox's "blocked for sending" reply is kept this long

UpstreamFactory = Callable[[RouteConfig, Config], Upstream]


class QueueManager(Control, Settling, Lanes):
    """The one owner of delivery state (see the module docstring)."""

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
        self._messages: dict[str, Queued] = {}
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
        # The read side: the only way notify, the web pages, metrics and tests see the queue.
        self.view = QueueView(self, self._messages)
        self.ledger = pacing.Ledger()  # each sending mailbox's recent recipients (pacing)
        self._limits: dict[str, tuple[RouteConfig, pacing.Limits]] = {}  # per route
        self._reserved: dict[str, tuple[str, int]] = {}  # qid -> (mailbox, recipients)
        self._budget_waits: dict[str, str] = {}  # qid -> the mailbox whose budget it waits for
        self.blocked: dict[str, tuple[str, float, str]] = {}  # mailbox -> (route, when, reply)
        self._usage_saved = 0.0  # monotonic
        self._usage_pruned = 0.0  # monotonic
        self._load_usage()

    @property
    def held_bytes(self) -> int:
        """Bytes of fresh messages held in memory for their first attempt (QueueView)."""
        return self._held_bytes

    # -- policy --------------------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        q = self.config.queue
        return Policy(q.retry_min_s, q.retry_max_s, q.max_age_s)

    def route_for(self, entry: Entry) -> RouteConfig | None:
        if entry.route is not None:
            return self.config.routes.get(entry.route)
        return self.router.lookup(entry.sender)

    def route_for_sender(self, sender: str) -> RouteConfig | None:
        return self.router.lookup(sender)

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
        return queue_id in self._messages

    def submit(self, entry: Entry, data: bytes | None = None) -> None:
        """A message just accepted (with its bytes) or recovered: deliver it when it is due."""
        if entry.id in self._messages:
            return
        queued = Queued(entry)
        if data is not None and self._held_bytes + len(data) <= MEMORY_HOLD_BYTES:
            queued.data = data
            self._held_bytes += len(data)
        self._messages[entry.id] = queued
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
            if entry.id in self._messages:
                continue
            if entry.pending():
                self.submit(entry)
            else:
                self._remove(entry, "every recipient was finished before the restart")

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
            queued = self._messages.get(qid)
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

    # -- main loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Wake deferred messages and serve control requests until stopped."""
        last_control = 0.0
        while not self._stopping:
            now = self.clock()
            while self._heap and self._heap[0][0] <= now:
                when, qid = heapq.heappop(self._heap)
                queued = self._messages.get(qid)
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
