"""Prometheus metrics for one service instance, served with /healthz on a small asyncio server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from relayd.auth import TokenHealth
from relayd.config import Address

if TYPE_CHECKING:
    from relayd.qmgr.pacing import MailboxUse

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0       # a client that sends no complete request in time is dropped
MAX_REQUEST_LINE_BYTES = 8192
MAX_HEADER_LINES = 100
STOP_TIMEOUT_S = 5.0
LINGER_S = 1.0
LINGER_BYTES = 256 * 1024
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

HealthCheck = Callable[[], bool]
"""True when healthy. False, or an exception whose text says why, makes /healthz answer 503."""


class Metrics:
    """The figures one relayd instance exports. Each instance has its own registry, so that
    several services in one process (tests) do not share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._stored = Counter("relayd_messages_accepted", "Messages accepted and queued",
                                 ["route"], registry=r)
        self._delivered = Counter("relayd_messages_delivered", "Messages delivered upstream",
                                  ["route"], registry=r)
        self._deferred = Counter("relayd_messages_deferred",
                                 "Delivery attempts deferred for a retry", ["route"], registry=r)
        self._bounced = Counter("relayd_messages_bounced",
                                "Messages failed permanently (a bounce was sent)", ["route"],
                                registry=r)
        self._in_doubt = Counter("relayd_attempts_in_doubt",
                                 "Attempts whose answer was lost after the request went out "
                                 "(relayd.delivery.doubt); lookup=yes: the next attempt looks "
                                 "in Sent Items, no: the resend may duplicate",
                                 ["route", "lookup"], registry=r)
        self._failed_logins = Counter("relayd_failed_logins",
                                      "Failed SMTP AUTH attempts on the listener", registry=r)
        self._latency = Histogram("relayd_delivery_latency_seconds",
                                  "Time one upstream delivery attempt took", ["route"],
                                  buckets=LATENCY_BUCKETS_S, registry=r)
        self._queue_depth = Gauge("relayd_queue_depth", "Messages in the queue", registry=r)
        self._queue_oldest = Gauge("relayd_queue_oldest_age_seconds",
                                   "Age of the oldest queued message (0 when empty)", registry=r)
        self._token_expiry = Gauge("relayd_token_expiry_seconds",
                                   "Seconds until the route's OAuth access token expires",
                                   ["route", "account"], registry=r)
        self._needs_signin = Gauge("relayd_token_needs_signin",
                                   "1 when the account must sign in again (relayd auth status)",
                                   ["route", "account"], registry=r)
        self._credential_expiry = Gauge("relayd_credential_expiry_seconds",
                                        "Seconds until the route's client secret or "
                                        "certificate expires", ["route"], registry=r)
        self._journal_dropped = Gauge("relayd_journal_dropped_events",
                                      "Journal events that could not be written since start",
                                      registry=r)
        labels = ["route", "mailbox"]
        self._mailbox_used = Gauge("relayd_mailbox_recipients_used",
                                   "Recipients a busy sending mailbox sent to within its daily "
                                   "budget's window (with those under way)", labels, registry=r)
        self._mailbox_budget = Gauge("relayd_mailbox_recipients_budget",
                                     "The sending mailbox's daily recipient budget (0: none)",
                                     labels, registry=r)
        self._mailbox_waiting = Gauge("relayd_mailbox_waiting_messages",
                                      "Messages waiting for the sending mailbox's rate or "
                                      "budget", labels, registry=r)
        self._children: dict[tuple[int, str], Any] = {}
        self._server: asyncio.Server | None = None
        self._healthy: HealthCheck = lambda: True
        self._clients: set[asyncio.Task[None]] = set()

    # --- figures -----------------------------------------------------------------------------

    def _of(self, metric: Any, route: str) -> Any:
        """The metric's child for a route, kept: labels() validates and locks on every call,
        and these are counted for every message. Routes come from the config, so few."""
        key = (id(metric), route)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(route=route)
        return child

    def stored(self, route: str) -> None:
        self._of(self._stored, route).inc()

    def delivered(self, route: str) -> None:
        self._of(self._delivered, route).inc()

    def deferred(self, route: str) -> None:
        self._of(self._deferred, route).inc()

    def bounced(self, route: str) -> None:
        self._of(self._bounced, route).inc()

    def in_doubt(self, route: str, lookup: bool) -> None:
        self._in_doubt.labels(route=route, lookup="yes" if lookup else "no").inc()

    def failed_login(self) -> None:
        self._failed_logins.inc()

    def observe_latency(self, route: str, seconds: float) -> None:
        self._of(self._latency, route).observe(max(0.0, seconds))

    def set_queue(self, depth: int, oldest_age_s: float) -> None:
        self._queue_depth.set(depth)
        self._queue_oldest.set(max(0.0, oldest_age_s))

    def set_token_health(self, health: TokenHealth, now: float) -> None:
        self._needs_signin.labels(route=health.route, account=health.account).set(
            1 if health.needs_signin else 0)
        if health.credential_expires_at is not None:
            self._credential_expiry.labels(route=health.route).set(
                health.credential_expires_at - now)

    def set_journal(self, dropped: int) -> None:
        self._journal_dropped.set(dropped)

    def set_token_expiry(self, route: str, account: str, seconds: float) -> None:
        self._token_expiry.labels(route=route, account=account).set(seconds)

    def set_mailboxes(self, uses: Sequence[MailboxUse]) -> None:
        """The busy sending mailboxes now (relayd.qmgr.pacing); the others are dropped."""
        for gauge in (self._mailbox_used, self._mailbox_budget, self._mailbox_waiting):
            gauge.clear()
        for use in uses:
            self._mailbox_used.labels(route=use.route, mailbox=use.mailbox).set(use.used)
            self._mailbox_budget.labels(route=use.route, mailbox=use.mailbox).set(use.budget)
            self._mailbox_waiting.labels(route=use.route, mailbox=use.mailbox).set(use.waiting)

    def render(self) -> bytes:
        """The Prometheus text exposition of every figure."""
        return generate_latest(self.registry)

    # --- HTTP endpoint -----------------------------------------------------------------------

    async def start(self, listen: Address, healthy: HealthCheck) -> int:
        """Serve GET /metrics and /healthz on `listen`; return the port actually bound."""
        if self._server is not None:
            raise RuntimeError("metrics endpoint already started")
        self._healthy = healthy
        self._server = await asyncio.start_server(self._on_client, listen.host, listen.port,
                                                  limit=MAX_REQUEST_LINE_BYTES)
        port: int = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s/metrics", Address(listen.host, port))
        return port

    async def stop(self) -> None:
        """Close the listener and any connection still open."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.wait(self._clients, timeout=STOP_TIMEOUT_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), STOP_TIMEOUT_S)

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            status, ctype, body, head = await asyncio.wait_for(self._respond(reader),
                                                               REQUEST_TIMEOUT_S)
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("ascii")
                + (b"" if head else body))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
            if status[0] == "4":
                # Lingering close: read what the client is still sending, so that closing with
                # unread input does not reset the connection before it reads the answer.
                writer.write_eof()
                await asyncio.wait_for(reader.read(LINGER_BYTES), LINGER_S)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), STOP_TIMEOUT_S)

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[str, str, bytes, bool]:
        """Read one request; return (status line, content type, body, is HEAD)."""
        text = "text/plain; charset=utf-8"
        try:
            request = await reader.readuntil(b"\n")
            for _ in range(MAX_HEADER_LINES):
                if (await reader.readuntil(b"\n")).strip() == b"":
                    break
            else:
                return "431 Request Header Fields Too Large", text, b"too many headers\n", False
        except asyncio.LimitOverrunError:
            return "431 Request Header Fields Too Large", text, b"request too large\n", False
        parts = request.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", text, b"bad request\n", False
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", text, b"GET only\n", False
        head = method == "HEAD"
        if target == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, self.render(), head
        if target == "/healthz":
            reason = self._health_problem()
            if reason is None:
                return "200 OK", text, b"ok\n", head
            return "503 Service Unavailable", text, f"unhealthy: {reason}\n".encode(), head
        return "404 Not Found", text, b"not found: try /metrics or /healthz\n", head

    def _health_problem(self) -> str | None:
        try:
            if self._healthy():
                return None
            return "health check failed"
        except Exception as e:  # the check's own failure is the reason
            return " ".join(str(e).split()) or type(e).__name__
