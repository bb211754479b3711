"""A route's delivery agent: a job in, a report out.

The agent owns what belongs to the route rather than to a message: its upstream and up to
`max_connections` sessions (an idle one is kept a few seconds for the next message), the
`rate_limit` token bucket, and the hold after the upstream was found unreachable (Postfix's
dead-destination idea: the route's other messages are deferred for `retry_min` without a
connection attempt each). It translates everything a session can raise into a `Report` with one
result per recipient; it never raises for a delivery and never calls the queue manager.

Timeouts and cancellation, the same on Python 3.11 to 3.13 (no asyncio.wait_for, whose
cancellation changed in 3.12, python/cpython#96764):
- Each call a session makes has its own timeout, the route's `timeout` (an SMTP reply:
  relayd.delivery.smtpclient; a Graph call: relayd.delivery.graphhttp; EWS: requests'). The
  agent's deadline around a whole attempt, `ATTEMPT_GRACE_S` later, is a backstop under
  `asyncio.timeout()`: an attempt still running then is cancelled and reported timed out
  (in doubt where Sent Items can be looked up). An attempt that returns its results as the
  deadline passes keeps them (smtpclient keeps the end-of-data reply that comes in the same
  loop pass as the cancellation).
- A stop (close) cancels the workers still busy after its wait: their jobs are reported
  STOPPED, except a job whose final reply came with the cancellation, which is reported as
  it went; that worker then stops (the request stays counted in Task.cancelling()).

Private-API touch points: none (asyncio.timeout and Task.cancelling are public since 3.11).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from relayd.config import RateLimit, RouteConfig
from relayd.delivery import doubt as doubts
from relayd.delivery.base import (
    OutboundMessage,
    RecipientResult,
    Session,
    SpooledBody,
    Status,
    Upstream,
)
from relayd.errors import (
    AuthenticationError,
    DeliveryError,
    InDoubtError,
    PermanentDeliveryError,
    TransientDeliveryError,
    UpstreamUnavailableError,
)
from relayd.reply import Reply

log = logging.getLogger(__name__)


def _fix_said(route: RouteConfig, reply: Reply) -> str:
    """The provider's fix for a refused login (relayd.providers), as the log line's tail."""
    from relayd.providers import fix_for

    fix = fix_for(route, reply)
    return f" (fix: {fix})" if fix else ""

IDLE_SESSION_S = 5.0  # keep an upstream connection this long after the route runs dry
ATTEMPT_GRACE_S = 30.0  # beyond the route's timeout, before an attempt is abandoned
TIMED_OUT = Reply.local("delivery attempt timed out", "4.4.2")
FOUND_IN_SENT = "found in the mailbox's Sent Items after a restart; not sent again"
FOUND_AFTER_DOUBT = ("found in the mailbox's Sent Items after an attempt whose answer was lost; "
                     "not sent again")
# Upstreams whose sent copy can be looked up (dedupe): an attempt cut off mid-call there is
# in doubt; elsewhere nothing can be done about it.
LOOKUP_UPSTREAMS = frozenset({"ews", "graph"})
CUT_OFF = "the attempt was cut off mid-call"
INTERNAL = Reply.local("internal error in relayd", "4.3.0")
STOPPED = Reply.local("the route's delivery agent stopped (reload or shutdown)", "4.3.0")


@dataclass(frozen=True)
class Job:
    """One attempt of one message for the recipients still pending."""

    queue_id: str
    sender: str
    recipients: Sequence[str]
    data: bytes
    mail_options: Sequence[str] = ()
    attempt: int = 1
    check_sent_since: float | None = None  # dedupe: look in Sent Items first (after a crash)
    spooled: SpooledBody | None = None  # a large message left in the spool (`data` is empty)
    # dedupe: why an earlier attempt may have gone out (relayd.delivery.doubt), and when that
    # attempt ended (epoch; None after a crash): the lookup waits for Sent Items' lag then.
    doubt: str = ""
    doubt_at: float | None = None


@dataclass(frozen=True)
class Report:
    """What the agent returns for one job. `held_s` set means nothing was tried: the route is
    held for that many more seconds. `retry_after` is the upstream's own back-off hint."""

    results: Mapping[str, RecipientResult] = field(default_factory=dict)
    retry_after: float | None = None
    held_s: float | None = None
    held_reply: Reply | None = None  # why the route is held
    unreachable: bool = False  # the upstream could not be reached (this job or the hold)
    problem: str = ""  # "authentication" when the route's credentials were refused
    found_in_sent: bool = False  # dedupe: already in Sent Items, not sent again
    # The message may have gone out although the attempt failed (relayd.delivery.doubt):
    # why. A dedupe route keeps it marked "started" and looks in Sent Items next time.
    doubt: str = ""


_Item = tuple[Job, "asyncio.Future[Report]"]  # a job and where its report goes


def auth_refused_advice(route: str, reply: str) -> str:
    """What relayd does when the upstream refuses a route's credentials (535 5.7.8, a wrong
    password), said once per run of failures in the log, on the status page and in a notice.

    The decision: defer, as Postfix does (its smtp client treats a refused login as a
    temporary failure), so that mail waits while an admin corrects the password, rather than
    bouncing every message of a route for a mistake in one file. The cost is that nobody
    learns of it from a bounce, hence the loud line."""
    return (f"the upstream refused the login ({reply}). relayd defers this route's mail, as "
            f"Postfix does, and retries it until it is older than queue.max_age, when it "
            f"bounces: correct routes.{route}'s credentials (password_file, or the app's "
            f"secret), then run `relayd queue retry --all`")


@dataclass
class RouteStats:
    """What the status page and [notify] read of a route (epoch seconds)."""

    last_success: float | None = None  # a recipient delivered
    last_failure: float | None = None  # an attempt that delivered nothing
    last_failure_reply: str = ""
    failing_since: float | None = None  # first of the current run of auth/unreachable failures
    failing_kind: str = ""  # "authentication" or "unreachable"

    def record(self, report: Report) -> bool:
        """Take in one attempt's report; True when it starts a run of failures."""
        now = time.time()
        statuses = {r.status for r in report.results.values()}
        if Status.DELIVERED in statuses:
            self.last_success = now
            self.failing_since, self.failing_kind = None, ""
            return False
        if report.held_s is not None or not report.results:
            return False
        self.last_failure = now
        self.last_failure_reply = str(next(iter(report.results.values())).reply)
        kind = "unreachable" if report.unreachable else report.problem
        if kind:
            if self.failing_since is None or self.failing_kind != kind:
                self.failing_since, self.failing_kind = now, kind
                return True
        elif Status.FAILED in statuses:
            pass  # a message refused for good says nothing about the route
        return False


class RateLimiter:
    """Token bucket: `count` messages per `per_s` seconds, bursts up to `count`."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = limit.count / limit.per_s
        self.capacity = float(limit.count)
        self.tokens = self.capacity
        self.clock = clock
        self.stamp = clock()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = self.clock()
                self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)


class DeliveryAgent:
    def __init__(self, route: RouteConfig, upstream: Upstream, hold_s: float) -> None:
        self.route = route
        self.upstream = upstream
        self.hold_s = hold_s
        self.limiter = RateLimiter(route.rate_limit) if route.rate_limit else None
        self.busy = 0  # jobs taken and not yet reported
        # A job goes to an idle worker's waiter if there is one, else waits here for the
        # next worker that comes back (see _worker).
        self._jobs: collections.deque[_Item] = collections.deque()
        self._waiting: collections.deque[asyncio.Future[_Item | None]] = collections.deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._taking = 0  # workers not yet stopping (they may take a job)
        self._retired = False
        self._hold_until = 0.0  # monotonic
        self._hold_reply: Reply | None = None
        self.stats = RouteStats()

    # -- what the queue manager asks -----------------------------------------------------------

    def has_capacity(self) -> bool:
        return not self._retired and self.busy < self.route.max_connections

    def held_s(self) -> float | None:
        """Seconds the route stays held, or None when it is not held."""
        left = self._hold_until - time.monotonic()
        return left if left > 0 else None

    @property
    def hold_reply(self) -> Reply | None:
        return self._hold_reply if self.held_s() is not None else None

    def release_hold(self) -> None:
        """`relayd queue retry`: the admin says the upstream is back; connect at once."""
        if self._hold_reply is not None:
            log.info("route %s: hold released on request", self.route.name)
        self._hold_until = 0.0
        self._hold_reply = None

    async def deliver(self, job: Job) -> Report:
        """Run one job on one of the route's sessions; never raises for a delivery problem."""
        future: asyncio.Future[Report] = asyncio.get_running_loop().create_future()
        self.busy += 1
        try:
            if not self._hand_over((job, future)):
                self._jobs.append((job, future))
                if self._taking < self.route.max_connections:
                    self._taking += 1
                    task = asyncio.create_task(self._worker(), name=f"agent-{self.route.name}")
                    self._workers.add(task)
                    task.add_done_callback(self._workers.discard)
            return await future
        finally:
            self.busy -= 1

    def _hand_over(self, item: _Item) -> bool:
        """Give a job to the longest-idle worker; False when none is waiting."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(item)
                return True
        return False

    async def close(self, timeout: float) -> None:
        """Finish the jobs taken within `timeout`, then cancel; release the upstream."""
        self._retired = True
        while self._waiting:  # idle workers stop now, not after IDLE_SESSION_S
            _stop_waiting(self._waiting.popleft())
        if self._workers:
            _, pending = await asyncio.wait(set(self._workers), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        while self._jobs:
            job, future = self._jobs.popleft()
            if not future.done():  # never started: a doubt stays as it was
                future.set_result(dataclasses.replace(_deferred(job, STOPPED), doubt=job.doubt))
        with contextlib.suppress(Exception):
            await self.upstream.close()

    # -- the sessions --------------------------------------------------------------------------

    async def _worker(self) -> None:
        session: Session | None = None
        try:
            session = self.upstream.session()
            while True:
                item = self._jobs.popleft() if self._jobs else None
                if item is None and not self._retired:
                    item = await self._wait_for_job()
                if item is None:  # idle IDLE_SESSION_S, or the agent closes
                    if self._jobs:
                        continue  # queued as the time ran out: taken before stopping
                    return
                job, future = item
                if future.done():  # the manager gave up on it (shutdown)
                    continue
                try:
                    report = await self._run(job, session)
                except Exception:
                    log.exception("%s: route %s: unexpected error; deferring", job.queue_id,
                                  self.route.name)
                    await _close_quietly(session)
                    report = self._cut_off(job, INTERNAL)
                except BaseException:
                    if not future.done():
                        future.set_result(self._cut_off(job, STOPPED))
                    raise
                if self.stats.record(report) and self.stats.failing_kind == "authentication" \
                        and self.route.uses_password:
                    log.error("route %s: %s", self.route.name, auth_refused_advice(
                        self.route.name, self.stats.last_failure_reply))
                if not future.done():
                    future.set_result(report)
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    return  # stopped as the attempt ended (smtpclient kept its final reply)
        finally:
            # Takes no more jobs: one that comes during the close's wait starts a new worker
            # (deliver) rather than wait for this one.
            self._taking -= 1
            if session is not None:
                with contextlib.suppress(Exception):
                    await session.close()

    async def _wait_for_job(self) -> _Item | None:
        """Idle: a job handed over (deliver), or None after IDLE_SESSION_S or at close. One
        future and one timer (wait_for on a queue cost a task a job); whichever comes first
        settles the waiter. A job that comes after the timer, before this worker runs again,
        finds no waiter and is queued while this worker still counts as taking jobs (so no new
        one starts): _worker takes it before it stops. bench/scale.py caught a worker that
        left such a job behind: 100,000 messages retried at once, 5 s after the route went
        idle, and nothing was ever sent."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[_Item | None] = loop.create_future()
        self._waiting.append(waiter)
        timer = loop.call_later(IDLE_SESSION_S, _stop_waiting, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            # Stopped (close) just after a job was handed over: queue it again, for close to
            # answer.
            handed = waiter.result() if waiter.done() and not waiter.cancelled() else None
            if handed is not None:
                self._jobs.appendleft(handed)
            raise
        finally:
            timer.cancel()
            if waiter in self._waiting:  # timed out or cancelled
                self._waiting.remove(waiter)

    async def _run(self, job: Job, session: Session) -> Report:
        held = self.held_s()
        if held is not None:  # nothing tried: a doubt stays as it was
            return Report(held_s=held, held_reply=self._hold_reply, doubt=job.doubt)
        if self.limiter is not None:
            await self.limiter.acquire()
        message = OutboundMessage(job.queue_id, job.sender, job.recipients, job.data,
                                  job.mail_options, job.spooled)
        if job.check_sent_since is not None and await self._found_in_sent(job, message):
            words = FOUND_AFTER_DOUBT if job.doubt_at is not None else FOUND_IN_SENT
            reply = Reply(250, "2.0.0", words, self.route.upstream)
            return Report({r: RecipientResult(Status.DELIVERED, reply) for r in job.recipients},
                          found_in_sent=True)
        try:
            async with asyncio.timeout(self.route.timeout_s + ATTEMPT_GRACE_S):
                results = await session.deliver(message)
        except UpstreamUnavailableError as e:
            if self.held_s() is None:
                log.warning("route %s: upstream unreachable, holding its mail for %ds: %s",
                            self.route.name, self.hold_s, e.reply)
                self._hold_until = time.monotonic() + self.hold_s
                self._hold_reply = e.reply
            return Report(_all(job.recipients, Status.DEFERRED, e), unreachable=True)
        except InDoubtError as e:
            return Report(_all(job.recipients, Status.DEFERRED, e), retry_after=e.retry_after,
                          doubt=e.reply.one_line())
        except TransientDeliveryError as e:
            auth = isinstance(e, AuthenticationError)
            log.log(logging.ERROR if auth else logging.INFO, "%s: route %s: %s%s", job.queue_id,
                    self.route.name, e.reply, _fix_said(self.route, e.reply) if auth else "")
            return Report(_all(job.recipients, Status.DEFERRED, e), retry_after=e.retry_after,
                          problem="authentication" if auth else "")
        except PermanentDeliveryError as e:
            return Report(_all(job.recipients, Status.FAILED, e))
        except TimeoutError:
            await _close_quietly(session)
            return self._cut_off(job, TIMED_OUT, mid_call=True)
        return Report(results)

    # -- dedupe: an earlier attempt that may have gone out (relayd.delivery.doubt) ----------

    def _cut_off(self, job: Job, reply: Reply, *, mid_call: bool = False) -> Report:
        """The report of an attempt stopped by relayd (timeout, shutdown, a bug). Where Sent
        Items can be looked up it is in doubt: the request may have been written (EWS's
        thread even goes on with it), or the lookup a doubt asked for did not finish."""
        report = _deferred(job, reply)
        if self.route.upstream not in LOOKUP_UPSTREAMS:
            return report
        why = f"{reply}: {CUT_OFF}" if mid_call or not job.doubt else job.doubt
        return Report(report.results, doubt=why)

    async def _found_in_sent(self, job: Job, message: OutboundMessage) -> bool:
        """Whether an earlier attempt already went out: one interrupted by a crash, or one
        whose answer was lost (`job.doubt_at`). After a doubt, a lookup that finds nothing
        looks again every SENT_ITEMS_POLL_S until SENT_ITEMS_LAG_S after the doubtful attempt
        ended (Sent Items lags the send), and only then says "not found"."""
        assert job.check_sent_since is not None
        deadline = (job.doubt_at + doubts.SENT_ITEMS_LAG_S) if job.doubt_at is not None \
            else 0.0
        looks = 0
        while True:
            try:
                async with asyncio.timeout(self.route.timeout_s + ATTEMPT_GRACE_S):
                    found = await self.upstream.find_sent(message, job.check_sent_since)
            except (DeliveryError, TimeoutError) as e:
                log.warning("%s: route %s: cannot look in Sent Items (%s); sending it again",
                            message.queue_id, self.route.name, e)
                return False
            looks += 1
            left = deadline - time.time()
            if found is not False or left <= 0:
                break
            await asyncio.sleep(min(doubts.SENT_ITEMS_POLL_S, left))
        what = f"attempt in doubt ({job.doubt})" if job.doubt_at is not None \
            else "interrupted attempt"
        log.info("%s: route %s: %s %s in Sent Items%s", message.queue_id, self.route.name,
                 what, "found" if found else "not found" if found is False
                 else "cannot be looked up", f" ({looks} lookups)" if looks > 1 else "")
        return bool(found)


def _stop_waiting(waiter: asyncio.Future[_Item | None]) -> None:
    """An idle worker's time is up, or the agent closes: the worker stops."""
    if not waiter.done():
        waiter.set_result(None)


async def _close_quietly(session: Session) -> None:
    with contextlib.suppress(Exception):
        await session.close()


def _deferred(job: Job, reply: Reply) -> Report:
    return Report({r: RecipientResult(Status.DEFERRED, reply) for r in job.recipients})


def _all(recipients: Sequence[str], status: Status,
         e: DeliveryError) -> dict[str, RecipientResult]:
    return {r: RecipientResult(status, e.reply) for r in recipients}
