"""The SMTP side of a relayd process: listening sockets, sessions, intake; and the listener
worker role (relayd.workers starts it), which is that side and nothing else.

The process roles (relayd.app): the main process owns the spool's lock, recovery, the queue
manager, notify, metrics and the web pages, and listens itself unless it has listener
workers; a `ListenerWorker` accepts and stores mail like any listener, then reports each
queue id to the main process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from relayd.accept import Acceptor
from relayd.config import Address, Config, ServerConfig
from relayd.errors import RelayError
from relayd.intake import Intake
from relayd.journal import Journal
from relayd.listener import Handler, LoginGuard, RelaySMTP, make_protocol_factory
from relayd.policy import SenderPolicy
from relayd.queue import Entry, Spool
from relayd.tls import server_context

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 30.0  # how long SIGTERM waits for sessions and deliveries in flight
SESSION_DRAIN_S = 10.0  # of which SMTP sessions get at most this much
LISTEN_BACKLOG = 512


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


class SmtpSide(ABC):
    """What every role that holds SMTP sessions has: the spool it stores into, the sender
    policy, the intake and the listener (relayd.listener.Relay). Where an accepted message
    goes next, and who counts it, is the role's (`_hand_on`, `accepted`, `failed_login`)."""

    def __init__(self, config: Config, listeners: Listeners | None, *,
                 journals_stored: bool) -> None:
        self.config = config
        self.spool = Spool(config.queue.path, keep_spares=True)
        self.policy = SenderPolicy(config)
        self.journal = Journal(config.journal)
        # A listener worker journals nothing itself: its `accepted` would come from a second
        # writer, batched apart from the main process's `delivered` (see report_stored).
        self.intake = Intake(self.spool, self._hand_on,
                             self.journal if journals_stored else None,
                             self._message_id_host)
        self.listeners = listeners
        self.handler = Handler(self)
        self.guard = LoginGuard(self.failed_login)
        self.sessions: set[RelaySMTP] = set()
        self.servers: list[Acceptor] = []
        self.addresses: list[tuple[str, int]] = []
        self.tls_addresses: list[tuple[str, int]] = []

    @abstractmethod
    def _hand_on(self, entry: Entry, data: bytes | None) -> None:
        """An accepted message, durable: to the queue manager, or to the main process."""

    @abstractmethod
    def stored(self, route: str) -> None: ...

    @abstractmethod
    def failed_login(self) -> None: ...

    def _message_id_host(self, route_name: str) -> str | None:
        route = self.config.routes.get(route_name)
        if route is not None and route.dedupe and route.upstream in ("ews", "graph"):
            return self.config.server.hostname
        return None

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

    async def _stop_listening(self, timeout: float) -> None:
        """Stop accepting; let sessions in flight finish (at most SESSION_DRAIN_S, or half of
        `timeout`), then close the rest."""
        loop = asyncio.get_running_loop()
        for server in self.servers:
            server.close()
        sessions_deadline = loop.time() + min(SESSION_DRAIN_S, timeout / 2)
        while self.sessions and loop.time() < sessions_deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.close_gracefully()
        self.servers.clear()


class ListenerWorker(SmtpSide):
    """A listener worker (server.workers > 1): it accepts and stores mail like any listener,
    then reports each queue id to the main process ("A ID", "L" for a failed login), which
    owns the queue manager, the queue lock, recovery, control requests and metrics."""

    def __init__(self, config: Config, *, report: Callable[[str], None],
                 listeners: Listeners | None = None) -> None:
        super().__init__(config, listeners, journals_stored=False)
        self.report = report

    def _hand_on(self, entry: Entry, data: bytes | None) -> None:
        """An accepted message, durable: to the main process."""
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

    def stored(self, route: str) -> None:
        """Counted by the main process, when it reads the report (report_stored)."""

    def failed_login(self) -> None:
        with contextlib.suppress(OSError):
            self.report("L")

    async def start(self) -> None:
        self.spool.create()
        await self._listen()  # the main process does everything else

    def reload(self, config: Config) -> None:
        """A new config's routes and senders, for the next session's commands (the main
        process logs the reload; listener settings need a restart)."""
        config = dataclasses.replace(config, server=self.config.server,
                                     queue=self.config.queue)
        self.config = config
        self.policy = SenderPolicy(config)
        log.debug("reload: config applied, %d route(s)", len(config.routes))

    async def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        await self._stop_listening(timeout)
        await asyncio.to_thread(self.spool.close)
        await asyncio.to_thread(self.journal.close)
        self.spool.unlock()
