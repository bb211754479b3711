"""Picks due messages and hands them to their route: backoff, per-route concurrency and rate,
bounces for permanent failures and for messages older than `queue.max_age`."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from typing import Protocol

from relayd.bounce import Failure, build_bounce
from relayd.config import Config, RateLimit, RouteConfig
from relayd.delivery import OutboundMessage, RecipientResult, Session, Status, Upstream
from relayd.errors import (
    AuthenticationError,
    DeliveryError,
    PermanentDeliveryError,
    TransientDeliveryError,
    UpstreamUnavailableError,
)
from relayd.queue import DELIVERED, FAILED, Entry, Spool
from relayd.router import Router

log = logging.getLogger(__name__)

CONTROL_POLL_S = 0.5
MEMORY_HOLD_BYTES = 64 * 1024 * 1024  # fresh messages kept in memory for their first attempt
INLINE_READ_MAX_BYTES = 256 * 1024  # spool files up to this size are read on the event loop
IDLE_SESSION_S = 5.0  # keep an upstream connection this long after the route runs dry
ATTEMPT_GRACE_S = 30.0  # beyond the route's timeout, before an attempt is abandoned


class Observer(Protocol):
    """What the scheduler reports (metrics); every method must be cheap and never raise."""

    def delivered(self, route: str) -> None: ...
    def deferred(self, route: str) -> None: ...
    def bounced(self, route: str) -> None: ...
    def observe_latency(self, route: str, seconds: float) -> None: ...


class NullObserver:
    def delivered(self, route: str) -> None:
        pass

    def deferred(self, route: str) -> None:
        pass

    def bounced(self, route: str) -> None:
        pass

    def observe_latency(self, route: str, seconds: float) -> None:
        pass


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


class RouteRunner:
    """Delivers one route's due messages over at most `max_connections` sessions."""

    def __init__(self, scheduler: Scheduler, route: RouteConfig, upstream: Upstream) -> None:
        self.scheduler = scheduler
        self.route = route
        self.upstream = upstream
        self.ready: asyncio.Queue[Entry] = asyncio.Queue()
        self.workers: set[asyncio.Task[None]] = set()
        self.idle = 0
        self.limiter = RateLimiter(route.rate_limit) if route.rate_limit else None
        self.retired = False
        # Set when the upstream could not be reached: until then, defer without trying.
        self.unreachable: tuple[float, UpstreamUnavailableError] | None = None

    def unreachable_error(self) -> UpstreamUnavailableError | None:
        if self.unreachable is None:
            return None
        until, error = self.unreachable
        if time.monotonic() >= until:
            self.unreachable = None
            return None
        return error

    def push(self, entry: Entry) -> None:
        self.ready.put_nowait(entry)
        if len(self.workers) < self.route.max_connections and self.ready.qsize() > self.idle:
            task = asyncio.create_task(self._worker(), name=f"route-{self.route.name}")
            self.workers.add(task)
            task.add_done_callback(self.workers.discard)

    async def _worker(self) -> None:
        session = self.upstream.session()
        try:
            while True:
                self.idle += 1
                try:
                    entry = await asyncio.wait_for(self.ready.get(),
                                                   0 if self.retired else IDLE_SESSION_S)
                except TimeoutError:
                    return
                finally:
                    self.idle -= 1
                if self.limiter is not None:
                    await self.limiter.acquire()
                await self.scheduler.attempt(entry, self.route, session)
        finally:
            with contextlib.suppress(Exception):
                await session.close()

    def requeue_all(self) -> list[Entry]:
        """Take back what is waiting (for a reload or shutdown)."""
        out = []
        while not self.ready.empty():
            out.append(self.ready.get_nowait())
        return out

    async def close(self, timeout: float) -> None:
        self.retired = True
        if self.workers:
            _, pending = await asyncio.wait(set(self.workers), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        with contextlib.suppress(Exception):
            await self.upstream.close()


UpstreamFactory = Callable[[RouteConfig, Config], Upstream]


class Scheduler:
    def __init__(self, config: Config, spool: Spool, upstream_factory: UpstreamFactory,
                 observer: Observer | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.spool = spool
        self.make_upstream = upstream_factory
        self.observer: Observer = observer or NullObserver()
        self.clock = clock
        self.router = Router(config.routes)
        self.entries: dict[str, Entry] = {}
        self.heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self.runners: dict[str, RouteRunner] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._retired: list[RouteRunner] = []
        self._held_bytes = 0

    # -- routes --------------------------------------------------------------------------------

    def upstream_for(self, route: RouteConfig) -> Upstream:
        return self._runner(route).upstream

    def _runner(self, route: RouteConfig) -> RouteRunner:
        runner = self.runners.get(route.name)
        if runner is None or runner.route != route:
            if runner is not None:
                self._retire(runner)
            runner = RouteRunner(self, route, self.make_upstream(route, self.config))
            self.runners[route.name] = runner
        return runner

    def _take_back(self, runner: RouteRunner) -> list[Entry]:
        """Entries waiting in a runner's queue stop being in flight."""
        entries = runner.requeue_all()
        for entry in entries:
            entry.active = False
            self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()
        return entries

    def _retire(self, runner: RouteRunner) -> None:
        for entry in self._take_back(runner):
            self._schedule(entry, self.clock())
        self._retired.append(runner)
        task = asyncio.create_task(runner.close(timeout=300))
        task.add_done_callback(lambda _t: self._retired.remove(runner))

    def reload(self, config: Config) -> None:
        """New routes apply from the next attempt; attempts in flight finish on the old ones."""
        self.config = config
        self.router = Router(config.routes)
        for name, runner in list(self.runners.items()):
            if config.routes.get(name) != runner.route:
                del self.runners[name]
                self._retire(runner)
        self._wake.set()

    def route_for(self, entry: Entry) -> RouteConfig | None:
        if entry.route is not None:
            return self.config.routes.get(entry.route)
        return self.router.lookup(entry.sender)

    # -- intake --------------------------------------------------------------------------------

    def submit(self, entry: Entry) -> None:
        """A message just accepted (or recovered): deliver it as soon as its route allows."""
        self.entries[entry.id] = entry
        self._hold(entry)
        if entry.next_attempt <= self.clock():
            self._dispatch(entry)
        else:
            self._schedule(entry, entry.next_attempt)

    async def _read(self, entry: Entry) -> bytes:
        """A message's bytes from the spool; small ones inline (a page-cache read costs less
        than the thread hop), large ones on a thread so the loop never stalls on them."""
        if entry.size <= INLINE_READ_MAX_BYTES:
            return self.spool.read_data(entry)
        return await asyncio.to_thread(self.spool.read_data, entry)

    def _hold(self, entry: Entry) -> None:
        """Keep a fresh message's bytes for its first attempt, within MEMORY_HOLD_BYTES."""
        if entry.data is None:
            return
        if self._held_bytes + len(entry.data) > MEMORY_HOLD_BYTES:
            entry.data = None  # read back from the spool when its turn comes
        else:
            self._held_bytes += len(entry.data)

    def _release(self, entry: Entry) -> None:
        if entry.data is not None:
            self._held_bytes -= len(entry.data)
            entry.data = None

    def _schedule(self, entry: Entry, when: float) -> None:
        entry.next_attempt = when
        heapq.heappush(self.heap, (when, next(self._seq), entry.id))
        self._wake.set()

    def _dispatch(self, entry: Entry) -> None:
        route = self.route_for(entry)
        if route is None:
            self._no_route(entry)
            return
        entry.active = True
        self._in_flight += 1
        self._idle.clear()
        self._runner(route).push(entry)

    def _no_route(self, entry: Entry) -> None:
        """The config changed under a queued message: keep it and keep trying, never drop it."""
        why = (f"route {entry.route!r} no longer exists" if entry.route
               else f"no route for sender <{entry.sender}> in the current config")
        log.warning("%s: deferred: %s", entry.id, why)
        results = {r: RecipientResult(Status.DEFERRED, None, why) for r in entry.pending()}
        entry.active = True
        self._in_flight += 1
        self._idle.clear()
        asyncio.create_task(self._finish_safely(entry, None, results, None))

    # -- attempts ------------------------------------------------------------------------------

    async def attempt(self, entry: Entry, route: RouteConfig, session: Session) -> None:
        """One delivery attempt of one entry; always ends with its state saved or it removed."""
        results: dict[str, RecipientResult] = {}
        retry_after: float | None = None
        pending = entry.pending()
        started = time.monotonic()
        runner = self.runners.get(route.name)
        try:
            if entry.deleted:
                return
            down = runner.unreachable_error() if runner else None
            if down is not None:
                raise down  # the route was just found unreachable: do not try again yet
            data = entry.data
            if data is None:
                data = await self._read(entry)
            message = OutboundMessage(entry.id, entry.sender, pending, data, entry.mail_options)
            results = await asyncio.wait_for(session.deliver(message),
                                             route.timeout_s + ATTEMPT_GRACE_S)
        except UpstreamUnavailableError as e:
            if runner is not None and runner.unreachable is None:
                log.warning("route %s: upstream unreachable, holding its mail for %ds: %s",
                            route.name, self.config.queue.retry_min_s, _reply(e))
                runner.unreachable = (time.monotonic() + self.config.queue.retry_min_s, e)
            results = _all(pending, Status.DEFERRED, e)
        except TransientDeliveryError as e:
            retry_after = e.retry_after
            level = logging.ERROR if isinstance(e, AuthenticationError) else logging.INFO
            log.log(level, "%s: route %s: %s", entry.id, route.name, _reply(e))
            results = _all(pending, Status.DEFERRED, e)
        except PermanentDeliveryError as e:
            results = _all(pending, Status.FAILED, e)
        except TimeoutError:
            with contextlib.suppress(Exception):
                await session.close()
            results = {r: RecipientResult(Status.DEFERRED, None, "delivery attempt timed out")
                       for r in pending}
        except FileNotFoundError:
            log.warning("%s: message file vanished (deleted?)", entry.id)
            entry.deleted = True
        except Exception:
            log.exception("%s: route %s: unexpected error; deferring", entry.id, route.name)
            with contextlib.suppress(Exception):
                await session.close()
            results = {r: RecipientResult(Status.DEFERRED, None, "internal error in relayd")
                       for r in pending}
        finally:
            self.observer.observe_latency(route.name, time.monotonic() - started)
            await self._finish_safely(entry, route, results, retry_after)

    async def _finish_safely(self, entry: Entry, route: RouteConfig | None,
                             results: dict[str, RecipientResult],
                             retry_after: float | None) -> None:
        try:
            await self._finish(entry, route, results, retry_after)
        except Exception:
            # The spool could not be written: keep the entry in memory and try again later;
            # on disk it is still the previous state, so nothing is lost.
            log.exception("%s: cannot record the attempt's outcome; will retry", entry.id)
            entry.active = False
            self._schedule(entry, self.clock() + self.config.queue.retry_min_s)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _finish(self, entry: Entry, route: RouteConfig | None,
                      results: dict[str, RecipientResult], retry_after: float | None) -> None:
        route_name = route.name if route else (entry.route or "-")
        now = self.clock()
        failures: list[Failure] = []
        for rcpt in entry.pending():
            res = results.get(rcpt) or RecipientResult(
                Status.DEFERRED, None, "no result from the upstream for this recipient")
            state = entry.rcpt[rcpt]
            if res.status is Status.DELIVERED:
                state.status, state.code, state.text = DELIVERED, res.code, res.text
                log.info("%s: delivered to <%s> via %s: %s", entry.id, rcpt, route_name,
                         _said(res))
                self.observer.delivered(route_name)
            elif res.status is Status.FAILED:
                state.status, state.code, state.text = FAILED, res.code, res.text
                failures.append(Failure(rcpt, res.code, res.text))
                log.info("%s: failed for <%s> via %s: %s", entry.id, rcpt, route_name,
                         _said(res))
            else:
                state.code, state.text = res.code, res.text
                entry.last_error = _said(res)
        entry.attempts += 1
        still = entry.pending()
        if still and not entry.deleted and now - entry.received > self.config.queue.max_age_s:
            age_h = (now - entry.received) / 3600
            for rcpt in still:
                state = entry.rcpt[rcpt]
                last = (f"{state.code} {state.text}" if state.code is not None else state.text)
                text = (f"message expired after {age_h:.1f} hours in the queue; last error: "
                        f"{last or entry.last_error or 'none'}")
                state.status, state.code, state.text = FAILED, None, text
                # RFC 3463 4.4.7: delivery time expired
                failures.append(Failure(rcpt, None, text, status="4.4.7"))
                log.info("%s: expired for <%s>: %s", entry.id, rcpt, text)
            still = []
        if failures and not entry.deleted:
            await self._bounce(entry, route_name, failures)
        entry.active = False
        self._release(entry)
        if entry.deleted or not still:
            self.spool.remove(entry.id, has_state=entry.has_state)
            self.entries.pop(entry.id, None)
            return
        delay = self._backoff(entry.attempts, retry_after)
        entry.next_attempt = now + delay
        await asyncio.to_thread(self.spool.save_state, entry)
        log.info("%s: deferred for %d recipient(s) via %s, next try in %ds: %s", entry.id,
                 len(still), route_name, delay, entry.last_error)
        self.observer.deferred(route_name)
        self._schedule(entry, entry.next_attempt)

    def _backoff(self, attempts: int, retry_after: float | None) -> float:
        q = self.config.queue
        delay: float = min(q.retry_max_s, q.retry_min_s * 2.0 ** max(0, attempts - 1))
        if retry_after is not None:
            delay = min(q.retry_max_s, max(retry_after, 1.0))
        return delay

    async def _bounce(self, entry: Entry, route_name: str, failures: list[Failure]) -> None:
        if entry.is_bounce:
            # Never bounce a bounce: say it loudly instead.
            log.error("%s: bounce to <%s> could not be delivered and is discarded: %s",
                      entry.id, ", ".join(f.recipient for f in failures),
                      "; ".join(f.text for f in failures))
            return
        original = entry.data
        if original is None:
            original = await self._read(entry)
        data = build_bounce(original=original, sender=entry.sender, failures=failures,
                            hostname=self.config.server.hostname, route=route_name,
                            queue_id=entry.id, arrival=entry.received)
        pinned = route_name if route_name in self.config.routes else None
        bounce = await self.spool.accept("", [entry.sender], data, client="relayd",
                                         route=pinned)
        log.info("%s: bounce %s queued to <%s> for %d recipient(s)", entry.id, bounce.id,
                 entry.sender, len(failures))
        self.observer.bounced(route_name)
        self.submit(bounce)

    # -- main loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Wake due entries and serve control requests until stopped."""
        last_control = 0.0
        while not self._stopping:
            now = self.clock()
            while self.heap and self.heap[0][0] <= now:
                when, _, qid = heapq.heappop(self.heap)
                entry = self.entries.get(qid)
                if entry is None or entry.active or entry.next_attempt != when:
                    continue  # stale heap item: rescheduled, deleted or already going
                self._dispatch(entry)
            if time.monotonic() - last_control >= CONTROL_POLL_S:
                last_control = time.monotonic()
                await self._control()
            timeout = CONTROL_POLL_S
            if self.heap:
                timeout = max(0.0, min(timeout, self.heap[0][0] - self.clock()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _control(self) -> None:
        try:
            requests = await asyncio.to_thread(self.spool.take_requests)
        except OSError as e:
            log.error("queue: cannot read control requests: %s", e)
            return
        for action, target in requests:
            ids = list(self.entries) if target == "all" else [target]
            for qid in ids:
                entry = self.entries.get(qid)
                if entry is None:
                    continue
                if action == "retry" and not entry.active:
                    log.info("%s: retry requested", qid)
                    self._schedule(entry, self.clock())
                elif action == "delete":
                    log.info("%s: deleted by request", qid)
                    entry.deleted = True
                    if not entry.active:
                        self.entries.pop(qid, None)
                        self._release(entry)
                        self.spool.remove(qid, has_state=entry.has_state)

    def stats(self) -> tuple[int, float]:
        """Queue depth and the age in seconds of the oldest entry."""
        if not self.entries:
            return 0, 0.0
        oldest = min(e.received for e in self.entries.values())
        return len(self.entries), max(0.0, self.clock() - oldest)

    async def drain(self, timeout: float) -> None:
        """Stop taking new work; let attempts in flight finish within `timeout`, then cancel."""
        self._stopping = True
        self._wake.set()
        for runner in self.runners.values():
            self._take_back(runner)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        runners = list(self.runners.values()) + list(self._retired)
        await asyncio.gather(*(r.close(timeout=1) for r in runners), return_exceptions=True)


def _all(recipients: list[str], status: Status, e: DeliveryError) -> dict[str, RecipientResult]:
    return {r: RecipientResult(status, e.code, e.text) for r in recipients}


def _said(res: RecipientResult) -> str:
    return f"{res.code} {res.text}" if res.code is not None else res.text


def _reply(e: DeliveryError) -> str:
    return f"{e.code} {e.text}" if e.code is not None else e.text
