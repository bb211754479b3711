"""Lifecycle: startup -> run -> drain -> shutdown, signals, reload."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relayd.accept import Acceptor
from relayd.auth import registry
from relayd.config import Address, Config, ServerConfig
from relayd.delivery import make_upstream
from relayd.errors import QueueError, RelayError, SpoolBusyError
from relayd.headers import MAX_HEADER_SCAN_BYTES, header_facts
from relayd.intake import Intake
from relayd.journal import Journal
from relayd.listener import Handler, LoginGuard, RelaySMTP, make_protocol_factory
from relayd.notify import Notifier
from relayd.policy import SenderPolicy
from relayd.qmgr import NullObserver, Observer, QueueManager, UpstreamFactory
from relayd.queue import Entry, Spool
from relayd.tls import server_context

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 30.0  # how long SIGTERM waits for sessions and deliveries in flight
SESSION_DRAIN_S = 10.0  # of which SMTP sessions get at most this much
LISTEN_BACKLOG = 512
QUEUE_GAUGE_INTERVAL_S = 5.0
TOKEN_HEALTH_GAUGE_S = 60.0  # token health metrics are read this often (token store I/O)
KEEP_FRESH_FIRST_S = 60.0  # after start, before the first background token refresh round
KEEP_FRESH_INTERVAL_S = 600.0  # between rounds; each token is refreshed at most weekly
RECOVER_BATCH = 2000  # recovered entries queued per turn of the event loop
UNREADABLE_LOG_S = 60.0  # reported ids that cannot be read yet: one line a minute


@dataclass
class Listeners:
    """Listening sockets bound once by the main process and shared with its workers."""

    plain: list[socket.socket]
    tls: list[socket.socket]


def bind_listeners(server: ServerConfig) -> Listeners:
    def bind(addr: Address) -> socket.socket:
        family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        try:
            return socket.create_server((addr.host, addr.port), family=family,
                                        backlog=LISTEN_BACKLOG)
        except OSError as e:
            raise ListenError(f"cannot listen on {addr}: {e.strerror or e}") from None

    return Listeners([bind(a) for a in server.listen], [bind(a) for a in server.listen_tls])


class ListenError(RelayError):
    """A listening address cannot be bound (in use, not on this machine, no permission)."""


class Service:
    """One running relay: listeners, intake, spool and queue manager for one config.

    With `report` set it is a listener worker (server.workers > 1): it accepts and stores mail
    like any listener, then reports each queue id to the main process, which owns the queue
    manager, the queue lock, recovery, control requests and metrics.
    """

    def __init__(self, config: Config, *, upstream_factory: UpstreamFactory = make_upstream,
                 observer: Observer | None = None, listeners: Listeners | None = None,
                 report: Callable[[str], None] | None = None, accept: bool = True) -> None:
        self.config = config
        self.accept = accept  # False: the workers hold the SMTP sessions, this one delivers
        self.spool = Spool(config.queue.path, keep_spares=True)
        self.policy = SenderPolicy(config)
        self.observer: Any = observer or NullObserver()
        self.journal = Journal(config.journal)
        self.qmgr = QueueManager(config, self.spool, upstream_factory, self.observer,
                                 router=self.policy.router, journal=self.journal)
        # A listener worker journals nothing itself: its `accepted` would come from a second
        # writer, batched apart from the main process's `delivered` (see worker_accepted).
        self.intake = Intake(self.spool, self._hand_on,
                             None if report is not None else self.journal,
                             self._message_id_host)
        # [notify] runs where the queue manager does: the main process, not a listener worker.
        self.notifier: Notifier | None = None
        self._notify_task: asyncio.Task[None] | None = None
        if report is None:
            self.notifier = Notifier(config, self.qmgr, self.intake)
            self.qmgr.on_bounce = self.notifier.on_bounce
            self.qmgr.on_found = self._found
        self.listeners = listeners
        self.report = report
        self.handler = Handler(self)
        self.guard = LoginGuard(self.failed_login)
        self.sessions: set[RelaySMTP] = set()
        self.servers: list[Acceptor] = []
        self.addresses: list[tuple[str, int]] = []
        self.tls_addresses: list[tuple[str, int]] = []
        self.metrics_port: int | None = None
        self.web: Any = None  # relayd.web.server.WebServer when [web] listen is set
        self.web_port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._recovery_stop = threading.Event()
        self.recovered = asyncio.Event()  # the spool's entries are all with the queue manager
        self._unreadable = 0  # reported ids not read yet since the last line about them
        self._unreadable_logged_at = -UNREADABLE_LOG_S

    # -- what the listener and the workers call ------------------------------------------------

    def _hand_on(self, entry: Entry, data: bytes | None) -> None:
        """An accepted message, durable: to the queue manager, or to the main process."""
        if self.report is None:
            self.qmgr.submit(entry, data)
            return
        try:
            self.report(f"A {entry.id}")
        except OSError as e:
            # The message is on disk; the main process finds it when it starts again. It
            # will not journal this acceptance, so the worker does.
            log.error("%s: cannot tell the main process (%s); it is queued all the same",
                      entry.id, e)
            self.journal.record("accepted", entry.id, message_id=entry.message_id,
                                **{"from": entry.sender}, to=entry.recipients,
                                client=entry.client, login=entry.login, size=entry.size)

    def _message_id_host(self, route_name: str) -> str | None:
        route = self.config.routes.get(route_name)
        if route is not None and route.dedupe and route.upstream in ("ews", "graph"):
            return self.config.server.hostname
        return None

    def worker_accepted(self, queue_id: str) -> None:
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
            entry, data = self.spool.load_accepted(queue_id)
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
        self._journal_accepted(entry, data)
        self.qmgr.submit(entry, data)

    def _found(self, entry: Entry) -> None:
        """An entry the queue manager's scan found (its report was lost): journal it and
        count it, as its report would have."""
        self._journal_accepted(entry, None)

    def _journal_accepted(self, entry: Entry, data: bytes | None) -> None:
        """A worker's message, before the queue manager has it: `accepted` in the journal,
        and counted."""
        route = self.qmgr.route_for(entry)
        name = route.name if route else "-"
        try:
            head = data if data is not None else self.spool.read_data(entry,
                                                                      MAX_HEADER_SCAN_BYTES)
        except OSError:
            head = b""
        self.intake.record_accepted(entry, header_facts(head)[1], name)
        self.accepted(name)

    def accepted(self, route: str) -> None:
        hook: Callable[[str], None] | None = getattr(self.observer, "accepted", None)
        if hook is not None:
            hook(route)

    def failed_login(self) -> None:
        if self.report is not None:
            with contextlib.suppress(OSError):
                self.report("L")
            return
        hook: Callable[[], None] | None = getattr(self.observer, "failed_login", None)
        if hook is not None:
            hook()

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
        if self.report is not None:
            await self._listen()  # a worker: the main process does everything else
            return
        self.spool.lock()
        try:
            self.spool.clean_tmp()
            # Listed before the listener opens: every id in it is from before this start, so
            # the recovery that follows never meets a message accepted (or a bounce stored)
            # in this run, which the queue manager has already been given.
            listing = await asyncio.to_thread(self.spool.listing)
            if self.accept:
                await self._listen()
            recovery = asyncio.create_task(self._recover(listing), name="recover")
            self._tasks.append(recovery)
            self._tasks.append(asyncio.create_task(self._run_qmgr(recovery), name="qmgr"))
            self._tasks.append(asyncio.create_task(self._report_queue(), name="queue-gauges"))
            self._tasks.append(asyncio.create_task(self._keep_tokens_fresh(), name="tokens"))
            if self.notifier is not None:
                self._notify_task = asyncio.create_task(self.notifier.run(), name="notify")
            await self._start_metrics()
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

    async def _listen(self) -> None:
        server_cfg = self.config.server
        # TLS when it is asked for: a certificate, an implicit-TLS port, or logins (which must
        # not cross a network in clear). A loopback-only relay without logins offers no
        # STARTTLS, since clients that upgrade opportunistically would reject a self-signed
        # certificate.
        tls = None
        if server_cfg.tls_cert or server_cfg.listen_tls or server_cfg.users:
            tls = await asyncio.to_thread(server_context, server_cfg, self.spool.path)
        plain = make_protocol_factory(self.handler, self.config, self.sessions, self.guard,
                                      starttls=tls)
        implicit = make_protocol_factory(self.handler, self.config, self.sessions, self.guard,
                                         implicit_tls=tls)
        listeners = self.listeners
        if listeners is None:
            listeners = await asyncio.to_thread(bind_listeners, server_cfg)
        for socks, factory, implicit_tls, bound in (
                (listeners.plain, plain, False, self.addresses),
                (listeners.tls, implicit, True, self.tls_addresses)):
            for sock in socks:
                # Implicit TLS too accepts plain: each protocol starts its own TLS layer
                # (RelaySMTP._start_implicit_tls).
                self.servers.append(Acceptor(sock, factory))
                host, port = sock.getsockname()[:2]
                bound.append((host, port))
                log.info("listening on %s%s", Address(host, port),
                         " (implicit TLS)" if implicit_tls else "")

    async def _start_metrics(self) -> None:
        listen = self.config.metrics.listen
        start = getattr(self.observer, "start", None)
        if listen is not None and start is not None:
            self.metrics_port = await start(listen, self.healthy)  # it logs where it listens
        if self.config.web.listen is not None:
            from relayd.web.server import WebServer

            self.web = WebServer(self.config, self.web_snapshot, self.qmgr,
                                 lambda: self.journal.healthy)
            self.web_port = await self.web.start()

    async def web_snapshot(self) -> Any:
        """What the status page shows, taken on the event loop (relayd.web.snapshot)."""
        from relayd.web.snapshot import take_snapshot

        return take_snapshot(self.config, self.qmgr.view)

    async def _report_queue(self) -> None:
        """Gauges that are read, not counted: queue depth and age, token lifetimes."""
        set_queue = getattr(self.observer, "set_queue", None)
        set_expiry = getattr(self.observer, "set_token_expiry", None)
        set_journal = getattr(self.observer, "set_journal", None)
        health_read = 0.0
        while set_queue is not None:
            set_queue(*self.qmgr.view.depth())
            set_mailboxes = getattr(self.observer, "set_mailboxes", None)
            if set_mailboxes is not None:
                set_mailboxes(self.qmgr.view.mailboxes())
            if set_journal is not None:
                set_journal(self.journal.dropped)
            now = time.time()
            for name, expiries in self.qmgr.view.token_expiries().items():
                for account, expires in expiries.items():
                    if set_expiry is not None:
                        set_expiry(name, account, expires - now)
            set_health = getattr(self.observer, "set_token_health", None)
            if set_health is not None and now - health_read >= TOKEN_HEALTH_GAUGE_S:
                # Token health reads (and decrypts) the token store: on a thread, and not
                # every few seconds.
                health_read = now
                for health in await asyncio.to_thread(registry.token_health, self.config):
                    set_health(health, now)
            await asyncio.sleep(QUEUE_GAUGE_INTERVAL_S)

    async def _keep_tokens_fresh(self) -> None:
        """Refresh idle delegated tokens well before they lapse (relayd.auth.health): a user
        who sends once a quarter must not find their sign-in expired."""
        await asyncio.sleep(KEEP_FRESH_FIRST_S)
        while True:
            for route in list(self.config.routes.values()):
                if route.client_id is None and route.provider != "google":
                    continue
                try:
                    await self.qmgr.agent_for(route).upstream.keep_fresh()
                except Exception as e:  # noqa: BLE001 - the next round tries again
                    log.warning("route %s: background token refresh failed: %s", route.name, e)
            await asyncio.sleep(KEEP_FRESH_INTERVAL_S)

    def reload(self, config: Config) -> None:
        """Apply a new config: routes change for the next attempt; sessions and the queue are
        untouched. Listener and queue settings need a restart."""
        for key in ("server", "queue"):
            if getattr(config, key) != getattr(self.config, key) and self.report is None:
                log.warning("reload: [%s] changed; restart relayd for it to take effect", key)
        config = dataclasses.replace(config, server=self.config.server,
                                     queue=self.config.queue)
        self.config = config
        self.policy = SenderPolicy(config)
        self.qmgr.reload(config, self.policy.router)
        if self.notifier is not None:
            self.notifier.reload(config)
        # Once per reload, by the main process (each listener worker applies it too).
        log.log(logging.INFO if self.report is None else logging.DEBUG,
                "reload: config applied, %d route(s)", len(config.routes))

    async def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Stop accepting, let sessions and deliveries in flight finish, then cancel."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._recovery_stop.set()
        if self._notify_task is not None:
            # First, so no notice is queued into a spool that is closing (a pending one is in
            # the notify state file and goes out after the restart).
            self._notify_task.cancel()
            await asyncio.gather(self._notify_task, return_exceptions=True)
            self._notify_task = None
        for server in self.servers:
            server.close()
        sessions_deadline = loop.time() + min(SESSION_DRAIN_S, timeout / 2)
        while self.sessions and loop.time() < sessions_deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.close_gracefully()
        self.servers.clear()
        await self.qmgr.drain(max(0.0, deadline - loop.time()))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        stop_metrics = getattr(self.observer, "stop", None)
        if stop_metrics is not None:
            await stop_metrics()
        if self.web is not None:
            await self.web.stop()
        await asyncio.to_thread(self.spool.close)
        await asyncio.to_thread(self.journal.close)
        self.spool.unlock()
