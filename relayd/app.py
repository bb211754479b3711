"""`relayd serve`: one composition per process role, and how each is started and stopped.

- `MainProcess`: the spool's lock, recovery, the queue manager, notify, metrics and the web
  pages, with 0..N listener workers (relayd.workers). With none it listens itself: that is
  "one process", also what runs under the Windows service manager (relayd.winservice). With
  workers the SMTP sessions are theirs, and this process schedules and delivers.
- `ListenerWorker` (relayd.service): accepts and stores mail, reports each queue id to the
  main process; started by `relayd _worker` (relayd.workers.worker_main).
- What the main process reports goes to a `ProcessObserver` (relayd.metrics.Metrics, or
  nothing).
- Stop and reload requests reach each role through one scope, relayd.platform.proc.Requests
  (signals on POSIX; Ctrl+C, Ctrl+Break and the service manager on Windows); `relayd reload`
  also leaves a request in control/ (`_reload_requests`), the only way on Windows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from relayd import loop as relayd_loop
from relayd import sdnotify
from relayd.auth import TokenHealth, registry
from relayd.config import Address, Config, folder_problems, load_config
from relayd.delivery import make_upstream
from relayd.errors import ConfigError, QueueError, RelayError, SpoolBusyError
from relayd.headers import MAX_HEADER_SCAN_BYTES, header_facts
from relayd.metrics import HealthCheck, Metrics
from relayd.notify import Notifier
from relayd.platform import proc
from relayd.policy import SenderPolicy
from relayd.qmgr import NullObserver, Observer, QueueManager, UpstreamFactory
from relayd.qmgr.pacing import MailboxUse
from relayd.queue import Entry, Spool
from relayd.service import SESSION_DRAIN_S, SHUTDOWN_TIMEOUT_S, Listeners, SmtpSide, bind_listeners
from relayd.workers import WorkerPool

if TYPE_CHECKING:
    from relayd.web.pages import Snapshot
    from relayd.web.server import WebServer

log = logging.getLogger(__name__)

RELOAD_POLL_S = 0.5  # control/ is looked at this often for `relayd reload` requests
QUEUE_GAUGE_INTERVAL_S = 5.0
TOKEN_HEALTH_GAUGE_S = 60.0  # token health metrics are read this often (token store I/O)
KEEP_FRESH_FIRST_S = 60.0  # after start, before the first background token refresh round
KEEP_FRESH_INTERVAL_S = 600.0  # between rounds; each token is refreshed at most weekly
RECOVER_BATCH = 2000  # recovered entries queued per turn of the event loop
UNREADABLE_LOG_S = 60.0  # reported ids that cannot be read yet: one line a minute


class ProcessObserver(Observer, Protocol):
    """What the main process reports besides the queue manager's events: counts, gauges, and
    the metrics listener's start and stop (relayd.metrics.Metrics). Every method must be
    cheap and never raise."""

    def stored(self, route: str) -> None: ...
    def failed_login(self) -> None: ...
    def set_queue(self, depth: int, oldest_age_s: float) -> None: ...
    def set_mailboxes(self, uses: Sequence[MailboxUse]) -> None: ...
    def set_journal(self, dropped: int) -> None: ...
    def set_token_expiry(self, route: str, account: str, seconds: float) -> None: ...
    def set_token_health(self, health: TokenHealth, now: float) -> None: ...
    async def start(self, listen: Address, healthy: HealthCheck) -> int: ...
    async def stop(self) -> None: ...


class NullProcessObserver(NullObserver):
    """No metrics: counts and gauges go nowhere."""

    def stored(self, route: str) -> None:
        pass

    def failed_login(self) -> None:
        pass

    def set_queue(self, depth: int, oldest_age_s: float) -> None:
        pass

    def set_mailboxes(self, uses: Sequence[MailboxUse]) -> None:
        pass

    def set_journal(self, dropped: int) -> None:
        pass

    def set_token_expiry(self, route: str, account: str, seconds: float) -> None:
        pass

    def set_token_health(self, health: TokenHealth, now: float) -> None:
        pass

    async def start(self, listen: Address, healthy: HealthCheck) -> int:
        raise RelayError("no metrics observer")

    async def stop(self) -> None:
        pass


class MainProcess(SmtpSide):
    """The main process of one relay: spool (and its lock), recovery, queue manager, notify,
    metrics and the web pages for one config. With listener workers (`workers` > 0, sharing
    `listeners`), the SMTP sessions are theirs and this process schedules and delivers; with
    none it listens itself (one process; also what runs under the Windows service manager).
    """

    def __init__(self, config: Config, *, upstream_factory: UpstreamFactory = make_upstream,
                 observer: ProcessObserver | None = None, listeners: Listeners | None = None,
                 workers: int = 0, config_path: str = "",
                 log_options: Sequence[str] = ()) -> None:
        super().__init__(config, listeners, journals_stored=True)
        self.observed = observer is not None  # metrics: gauges read, a listener to start
        self.observer: ProcessObserver = observer or NullProcessObserver()
        self.qmgr = QueueManager(config, self.spool, upstream_factory, self.observer,
                                 router=self.policy.router, journal=self.journal)
        # [notify] runs where the queue manager does: the main process, not a listener worker.
        self.notifier = Notifier(config, self.qmgr, self.intake)
        self._notify_task: asyncio.Task[None] | None = None
        self.qmgr.on_bounce = self.notifier.on_bounce
        self.qmgr.on_found = self._found
        # server.workers counts this process too: it delivers, the other workers listen.
        self.pool = (WorkerPool(self, config_path, listeners, workers, log_options)
                     if workers > 0 and listeners is not None else None)
        self.metrics_port: int | None = None
        self.web: WebServer | None = None  # when [web] listen is set
        self.web_port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._recovery_stop = threading.Event()
        self.recovered = asyncio.Event()  # the spool's entries are all with the queue manager
        self._unreadable = 0  # reported ids not read yet since the last line about them
        self._unreadable_logged_at = -UNREADABLE_LOG_S

    # -- what the listener and the workers call ------------------------------------------------

    def _hand_on(self, entry: Entry, data: bytes | None) -> None:
        """An accepted message, durable: to the queue manager."""
        self.qmgr.submit(entry, data)

    def report_stored(self, queue_id: str) -> None:
        """A listener worker stored `queue_id`: journal it, count it and queue it (main
        process).

        The journal's order is made here, at its one writer: `accepted` is recorded before
        the queue manager is given the message, so no `delivered`/`deferred` of it can come
        first. When each worker journaled its own `accepted`, two processes appended batches
        half a second apart to one file, and `accepted` landed after `delivered` for about
        one message in five (and times went back and forth between batches)."""
        if self.qmgr.has(queue_id):
            return
        try:
            entry, data = self.spool.load_stored(queue_id)
        except SpoolBusyError as e:
            # Not lost: read again shortly, and the scan of msg/ would find it anyway. Out of
            # descriptors, every report fails alike: one line a minute, not one a message.
            self.qmgr.read_later(queue_id)
            self._unreadable += 1
            now = time.monotonic()
            if now - self._unreadable_logged_at >= UNREADABLE_LOG_S:
                log.warning("%d reported message(s) cannot be read yet, the latest %s (%s); "
                            "they are read again shortly", self._unreadable, queue_id, e)
                self._unreadable_logged_at, self._unreadable = now, 0
            return
        except QueueError as e:
            log.error("a worker reported %s, which cannot be read: %s", queue_id, e)
            return
        self._journal_stored(entry, data)
        self.qmgr.submit(entry, data)

    def _found(self, entry: Entry) -> None:
        """An entry the queue manager's scan found (its report was lost): journal it and
        count it, as its report would have."""
        self._journal_stored(entry, None)

    def _journal_stored(self, entry: Entry, data: bytes | None) -> None:
        """A worker's message, before the queue manager has it: `accepted` in the journal,
        and counted."""
        route = self.qmgr.route_for(entry)
        name = route.name if route else "-"
        try:
            head = data if data is not None else self.spool.read_data(entry,
                                                                      MAX_HEADER_SCAN_BYTES)
        except OSError:
            head = b""
        self.intake.journal_stored(entry, header_facts(head)[1], name)
        self.stored(name)

    def stored(self, route: str) -> None:
        self.observer.stored(route)

    def failed_login(self) -> None:
        self.observer.failed_login()

    def healthy(self) -> bool:
        """For /healthz: the spool takes writes, and so does the journal."""
        if not self.journal.healthy:
            raise OSError(f"journal {self.config.journal.path} cannot be written")
        return self.spool.writable()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, *, wait_for_recovery: bool = True) -> None:
        """Lock the spool, open the listener, recover the spool's entries (on a thread, while
        the listener already answers), start the queue manager. With `wait_for_recovery`
        False (`relayd serve`) this returns before the recovery is done, so that workers,
        signals and systemd's READY come at once; `recovered` is set when it is."""
        self.spool.create()
        self.spool.lock()
        try:
            self.spool.clean_tmp()
            # Listed before the listener opens: every id in it is from before this start, so
            # the recovery that follows never meets a message accepted (or a bounce stored)
            # in this run, which the queue manager has already been given.
            listing = await asyncio.to_thread(self.spool.listing)
            if self.pool is None:
                await self._listen()
            recovery = asyncio.create_task(self._recover(listing), name="recover")
            self._tasks.append(recovery)
            self._tasks.append(asyncio.create_task(self._run_qmgr(recovery), name="qmgr"))
            if self.observed:
                self._tasks.append(asyncio.create_task(self._report_queue(),
                                                       name="queue-gauges"))
            self._tasks.append(asyncio.create_task(self._keep_tokens_fresh(), name="tokens"))
            self._notify_task = asyncio.create_task(self.notifier.run(), name="notify")
            await self._start_metrics()
            if self.pool is not None:
                await self._start_workers(self.pool)
            if wait_for_recovery:
                await recovery
        except BaseException:
            await self.stop(timeout=1)
            raise

    async def _run_qmgr(self, recovery: asyncio.Task[None]) -> None:
        """The queue manager's loop, once the recovery is done: its control requests wait for
        it, so a `queue delete` of a message not yet read is not lost."""
        try:
            await recovery
        except Exception:
            # Entries it did not reach stay on disk and are recovered at the next start.
            log.exception("queue: recovery failed; messages accepted from now on are "
                          "delivered, the rest after a restart")
        await self.qmgr.run()

    async def _recover(self, listing: tuple[list[str], set[str]]) -> None:
        """Read the spool's entries on a thread while the listener already answers (100,000
        entries take seconds), then queue them in batches that leave the event loop free
        between them. Messages accepted meanwhile are not in `listing` (taken before the
        listener opened), and bounces are matched to their messages before any is queued."""
        try:
            recovered = await asyncio.to_thread(
                lambda: list(self.spool.recover(listing, self._recovery_stop)))
        finally:
            self._recovery_stop.set()  # cancelled (stop): the thread ends at its next entry
        if recovered:
            log.info("queue: recovered %d message(s) from %s", len(recovered), self.spool.path)
        self.qmgr.mark_bounced(recovered)
        for start in range(0, len(recovered), RECOVER_BATCH):
            self.qmgr.take_recovered(recovered[start:start + RECOVER_BATCH])
            await asyncio.sleep(0)
        self.recovered.set()

    async def _start_workers(self, pool: WorkerPool) -> None:
        await pool.start()
        assert self.listeners is not None
        for sock in self.listeners.plain + self.listeners.tls:
            host, port = sock.getsockname()[:2]
            self.addresses.append((host, port))
            log.info("listening on %s (%d listener processes)", Address(host, port),
                     pool.count)

    async def _start_metrics(self) -> None:
        listen = self.config.metrics.listen
        if listen is not None and self.observed:
            # it logs where it listens
            self.metrics_port = await self.observer.start(listen, self.healthy)
        if self.config.web.listen is not None:
            from relayd.web.server import WebServer  # only when asked for: it loads the pages

            self.web = WebServer(self.config, self.web_snapshot, self.qmgr,
                                 lambda: self.journal.healthy)
            self.web_port = await self.web.start()

    async def web_snapshot(self) -> Snapshot:
        """What the status page shows, taken on the event loop (relayd.web.snapshot)."""
        from relayd.web.snapshot import take_snapshot

        return take_snapshot(self.config, self.qmgr.view)

    async def _report_queue(self) -> None:
        """Gauges that are read, not counted: queue depth and age, token lifetimes."""
        observer = self.observer
        health_read = 0.0
        while True:
            observer.set_queue(*self.qmgr.view.depth())
            observer.set_mailboxes(self.qmgr.view.mailboxes())
            observer.set_journal(self.journal.dropped)
            now = time.time()
            for name, expiries in self.qmgr.view.token_expiries().items():
                for account, expires in expiries.items():
                    observer.set_token_expiry(name, account, expires - now)
            if now - health_read >= TOKEN_HEALTH_GAUGE_S:
                # Token health reads (and decrypts) the token store: on a thread, and not
                # every few seconds.
                health_read = now
                for health in await asyncio.to_thread(registry.token_health, self.config):
                    observer.set_token_health(health, now)
            await asyncio.sleep(QUEUE_GAUGE_INTERVAL_S)

    async def _keep_tokens_fresh(self) -> None:
        """Refresh idle delegated tokens well before they lapse (relayd.auth.health): a user
        who sends once a quarter must not find their sign-in expired."""
        await asyncio.sleep(KEEP_FRESH_FIRST_S)
        while True:
            # Through the token registry: no route's upstream client is built for this.
            await registry.keep_tokens_fresh(self.config)
            await asyncio.sleep(KEEP_FRESH_INTERVAL_S)

    def reload(self, config: Config) -> None:
        """Apply a new config: routes change for the next attempt; sessions and the queue are
        untouched. Listener and queue settings need a restart."""
        for key in ("server", "queue"):
            if getattr(config, key) != getattr(self.config, key):
                log.warning("reload: [%s] changed; restart relayd for it to take effect", key)
        config = dataclasses.replace(config, server=self.config.server,
                                     queue=self.config.queue)
        self.config = config
        self.policy = SenderPolicy(config)
        self.qmgr.reload(config, self.policy.router)
        self.notifier.reload(config)
        if self.pool is not None:
            self.pool.reload()
        # Once per reload, by the main process (each listener worker applies it too).
        log.info("reload: config applied, %d route(s)", len(config.routes))

    def reload_from(self, path: str) -> None:
        """SIGHUP or `relayd reload`: read the config at `path` again and apply it, or keep
        the running one if it has problems."""
        proc.reloading()
        try:
            new = load_config(path)
        except ConfigError as e:
            log.error("reload refused, keeping the running config: %s", "; ".join(e.problems))
        else:
            self.reload(new)
        proc.ready()

    async def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Stop accepting, let sessions and deliveries in flight finish, then cancel."""
        if self.pool is not None:
            await self.pool.stop(SESSION_DRAIN_S + 5)  # their sessions drain; their ids come in
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._recovery_stop.set()
        if self._notify_task is not None:
            # First, so no notice is queued into a spool that is closing (a pending one is in
            # the notify state file and goes out after the restart).
            self._notify_task.cancel()
            await asyncio.gather(self._notify_task, return_exceptions=True)
            self._notify_task = None
        await self._stop_listening(timeout)
        await self.qmgr.drain(max(0.0, deadline - loop.time()))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.observed:
            await self.observer.stop()
        if self.web is not None:
            await self.web.stop()
        await asyncio.to_thread(self.spool.close)
        await asyncio.to_thread(self.journal.close)
        self.spool.unlock()


def use_cpu_scheduling(choice: str) -> None:
    """server.cpu_scheduling, at start, before any thread or listener worker exists (both
    inherit it from here).

    The policy:
    - "batch" (the default): a relayd started with the normal policy (SCHED_OTHER) moves to
      SCHED_BATCH. Its priority (nice) stays; what changes is that a relayd thread that wakes
      up (a reply came, an fsync finished) no longer preempts the thread running on that CPU,
      but waits for that thread's turn to end or for a free CPU. A relay's work is a
      stream of short steps whose order nobody watches, and the three processes of the
      default layout kept preempting one another: 19 context switches a message, and 11
      with SCHED_BATCH, for 13 % less CPU a message (the median of seven paired
      bench/run.sh runs) and the same mail a second (bench/README.md).
    - Any other policy relayd was started with (systemd's CPUSchedulingPolicy=, chrt) is the
      admin's choice and is kept; so is the normal one with "inherit".
    - Where the call is refused (the shipped unit's system-call filter refuses it, and sets
      CPUSchedulingPolicy=batch itself), relayd says so in one line and runs on as it is.
    Rejected: nice +N, which would give relayd less CPU when the machine is busy, not fewer
    preemptions."""
    if choice != "batch" or not hasattr(os, "SCHED_BATCH"):
        return
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            return
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as e:
        log.info("server.cpu_scheduling: SCHED_BATCH refused (%s); running with the normal "
                 "policy", e.strerror)


def _say_at_start(config: Config) -> None:
    """The config's warnings, and each dry-run route, once at start."""
    for warning in config.warnings:
        log.warning("config: %s", warning)
    for route in config.routes.values():
        if route.upstream == "outbox":
            # the bundled conf/relayd.toml is one: say that nothing leaves, and where it goes
            where = str(route.outbox.path)
            if not os.path.isabs(where):
                where += f" ({os.path.abspath(where)})"
            log.warning("route %s is a dry run: its mail (%s) is written as .eml files to %s "
                        "and delivered nowhere", route.name, ", ".join(route.senders), where)


async def serve(path: str, *, ready: Callable[[MainProcess], None] | None = None,
                log_options: Sequence[str] = ()) -> int:
    """`relayd serve`: run until SIGTERM/SIGINT; SIGHUP reloads. Returns the exit code."""
    config = load_config(path)
    if problems := folder_problems(config):  # Windows: a spool or token folder others can read
        raise ConfigError(problems, config.source)
    _say_at_start(config)
    use_cpu_scheduling(config.server.cpu_scheduling)
    # With workers, the SMTP sessions are theirs and this process schedules and delivers.
    listeners = bind_listeners(config.server) if config.server.workers > 1 else None
    main = MainProcess(config, observer=Metrics(), listeners=listeners,
                       workers=config.server.workers - 1 if listeners is not None else 0,
                       config_path=path, log_options=log_options)
    await main.start(wait_for_recovery=False)
    stop = asyncio.Event()
    signals_seen = 0

    def on_stop(signame: str) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("%s again: exiting now", signame)
            os._exit(1)
        log.info("%s: draining and stopping", signame)
        proc.stopping("draining")
        stop.set()

    def on_reload() -> None:
        main.reload_from(path)

    with proc.Requests(asyncio.get_running_loop(), on_stop, on_reload):
        log.info("relayd started with %s (event loop: %s), pid %d", path, relayd_loop.name(),
                 os.getpid())
        proc.ready("listening on " + ", ".join(str(Address(h, p)) for h, p in main.addresses))
        watchdog = asyncio.create_task(sdnotify.watchdog_loop(), name="watchdog")
        reloads = asyncio.create_task(_reload_requests(main.spool, on_reload), name="reloads")
        if ready is not None:
            ready(main)
        try:
            await stop.wait()
        finally:
            reloads.cancel()
            await main.stop()  # the workers first: their sessions drain, their ids come in
            watchdog.cancel()
            await asyncio.gather(watchdog, reloads, return_exceptions=True)
    log.info("relayd stopped")
    return 0


async def _reload_requests(spool: Spool, on_reload: Callable[[], None]) -> None:
    """`relayd reload`: its request in control/ reloads as SIGHUP does (the only way on
    Windows). Several waiting at once are one reload."""
    while True:
        await asyncio.sleep(RELOAD_POLL_S)
        try:
            taken = await asyncio.to_thread(spool.take_requests, ("reload",))
        except OSError as e:
            log.debug("cannot read reload requests: %s", e)
            continue
        if taken:
            log.info("reload requested (relayd reload)")
            on_reload()
