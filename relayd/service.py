"""Lifecycle: startup -> run -> drain -> shutdown, signals, reload."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from relayd import notify
from relayd.config import Address, Config, load_config
from relayd.delivery import Upstream, make_upstream
from relayd.errors import ConfigError
from relayd.listener import Handler, LoginGuard, RelaySMTP, make_protocol_factory
from relayd.metrics import Metrics
from relayd.queue import Entry, Spool
from relayd.router import Router
from relayd.scheduler import NullObserver, Observer, Scheduler, UpstreamFactory
from relayd.tls import server_context

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 30.0  # how long SIGTERM waits for sessions and deliveries in flight
SESSION_DRAIN_S = 10.0  # of which SMTP sessions get at most this much
LISTEN_BACKLOG = 512
QUEUE_GAUGE_INTERVAL_S = 5.0


class Service:
    """One running relay: listeners, spool and scheduler for one config."""

    def __init__(self, config: Config, *, upstream_factory: UpstreamFactory = make_upstream,
                 observer: Observer | None = None) -> None:
        self.config = config
        self.spool = Spool(config.queue.path)
        self.router = Router(config.routes)
        self.observer: Any = observer or NullObserver()
        self.scheduler = Scheduler(config, self.spool, upstream_factory, self.observer)
        self.handler = Handler(self)
        self.guard = LoginGuard(self._failed_login)
        self.sessions: set[RelaySMTP] = set()
        self.servers: list[asyncio.Server] = []
        self.addresses: list[tuple[str, int]] = []
        self.tls_addresses: list[tuple[str, int]] = []
        self.metrics_port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- what the listener calls ---------------------------------------------------------------

    def upstream_for_sender(self, sender: str) -> Upstream | None:
        route = self.router.lookup(sender)
        return self.scheduler.upstream_for(route) if route else None

    def submit(self, entry: Entry) -> None:
        self.scheduler.submit(entry)

    def accepted(self, route: str) -> None:
        hook: Callable[[str], None] | None = getattr(self.observer, "accepted", None)
        if hook is not None:
            hook(route)

    def _failed_login(self) -> None:
        hook: Callable[[], None] | None = getattr(self.observer, "failed_login", None)
        if hook is not None:
            hook()

    def healthy(self) -> bool:
        """For /healthz: the spool takes writes."""
        return self.spool.writable()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self.spool.create()
        self.spool.lock()
        try:
            self.spool.clean_tmp()
            recovered = 0
            for entry in self.spool.recover():
                self.scheduler.submit(entry)
                recovered += 1
            if recovered:
                log.info("queue: recovered %d message(s) from %s", recovered, self.spool.path)
            self._tasks.append(asyncio.create_task(self.scheduler.run(), name="scheduler"))
            self._tasks.append(asyncio.create_task(self._report_queue(), name="queue-gauges"))
            await self._listen()
            await self._start_metrics()
        except BaseException:
            await self.stop(timeout=1)
            raise

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
                                         implicit_tls=True)
        for addrs, factory, ssl_ctx, bound in (
                (server_cfg.listen, plain, None, self.addresses),
                (server_cfg.listen_tls, implicit, tls, self.tls_addresses)):
            for addr in addrs:
                server = await _create_server(factory, addr, ssl_ctx)
                self.servers.append(server)
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    bound.append((host, port))
                    log.info("listening on %s%s", Address(host, port),
                             " (implicit TLS)" if ssl_ctx else "")

    async def _start_metrics(self) -> None:
        listen = self.config.metrics.listen
        start = getattr(self.observer, "start", None)
        if listen is not None and start is not None:
            self.metrics_port = await start(listen, self.healthy)
            log.info("metrics on http://%s/metrics", Address(listen.host, self.metrics_port))

    async def _report_queue(self) -> None:
        """Gauges that are read, not counted: queue depth and age, token lifetimes."""
        set_queue = getattr(self.observer, "set_queue", None)
        set_expiry = getattr(self.observer, "set_token_expiry", None)
        while set_queue is not None:
            set_queue(*self.scheduler.stats())
            now = time.time()
            for name, runner in list(self.scheduler.runners.items()):
                for account, expires in runner.upstream.token_expiries().items():
                    if set_expiry is not None:
                        set_expiry(name, account, expires - now)
            await asyncio.sleep(QUEUE_GAUGE_INTERVAL_S)

    def reload(self, config: Config) -> None:
        """Apply a new config: routes change for the next attempt; sessions and the queue are
        untouched. Listener and queue settings need a restart."""
        for key in ("server", "queue"):
            if getattr(config, key) != getattr(self.config, key):
                log.warning("reload: [%s] changed; restart relayd for it to take effect", key)
        config = _with(config, server=self.config.server, queue=self.config.queue)
        self.config = config
        self.router = Router(config.routes)
        self.scheduler.reload(config)
        log.info("reload: config applied, %d route(s)", len(config.routes))

    async def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Stop accepting, let sessions and deliveries in flight finish, then cancel."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for server in self.servers:
            server.close()
        sessions_deadline = loop.time() + min(SESSION_DRAIN_S, timeout / 2)
        while self.sessions and loop.time() < sessions_deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.close_gracefully()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()
        await self.scheduler.drain(max(0.0, deadline - loop.time()))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        stop_metrics = getattr(self.observer, "stop", None)
        if stop_metrics is not None:
            await stop_metrics()
        await asyncio.to_thread(self.spool.close)
        self.spool.unlock()


def _with(config: Config, **changes: Any) -> Config:
    import dataclasses

    return dataclasses.replace(config, **changes)


async def _create_server(factory: Callable[[], RelaySMTP], addr: Address,
                         ssl_ctx: ssl.SSLContext | None) -> asyncio.Server:
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    loop = asyncio.get_running_loop()
    return await loop.create_server(factory, host=addr.host, port=addr.port, family=family,
                                    reuse_address=True, backlog=LISTEN_BACKLOG, ssl=ssl_ctx)


async def serve(path: str, *, ready: Callable[[Service], None] | None = None) -> int:
    """`relayd serve`: run until SIGTERM/SIGINT; SIGHUP reloads. Returns the exit code."""
    config = load_config(path)
    for warning in config.warnings:
        log.warning("config: %s", warning)
    service = Service(config, observer=Metrics())
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_stop(signame: str) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("%s again: exiting now", signame)
            os._exit(1)
        log.info("%s: draining and stopping", signame)
        notify.stopping("draining")
        stop.set()

    def on_reload() -> None:
        notify.reloading()
        try:
            new = load_config(path)
        except ConfigError as e:
            log.error("reload refused, keeping the running config: %s", "; ".join(e.problems))
        else:
            service.reload(new)
        notify.ready()

    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    log.info("relayd started with %s", path)
    notify.ready("listening on " + ", ".join(str(Address(h, p)) for h, p in service.addresses))
    watchdog = asyncio.create_task(notify.watchdog_loop(), name="watchdog")
    if ready is not None:
        ready(service)
    try:
        await stop.wait()
    finally:
        await service.stop()
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("relayd stopped")
    return 0
