"""The SMTP listener (aiosmtpd): connection, MAIL/RCPT/DATA policy and queueing. It never
delivers; DATA is answered 250 only once the message is on stable storage."""

from __future__ import annotations

import asyncio
import functools
import inspect
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword
from aiosmtpd.smtp import Session as SmtpSession

from relayd.auth.passwords import hash_password, verify_password
from relayd.config import Config, ServerUser
from relayd.intake import Intake
from relayd.policy import SenderPolicy

log = logging.getLogger(__name__)

# Replies are constants with enhanced status codes; nothing from an exception reaches a client.
REPLY_ACCESS_DENIED = "554 5.7.1 Access denied: your address is not allowed to use this relay"
REPLY_SENDER_OK = "250 2.1.0 Sender ok"
REPLY_RCPT_OK = "250 2.1.5 Recipient ok"
REPLY_NULL_SENDER = "550 5.7.1 Null sender not accepted from clients"
REPLY_BAD_ADDRESS = "553 5.1.3 Malformed address"
REPLY_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
REPLY_TEMP_STORAGE = "451 4.3.0 Temporary problem storing the message; try again later"
REPLY_INTERNAL = "451 4.3.0 Temporary internal problem; try again later"
REPLY_AUTH_REQUIRED = "530 5.7.0 Authentication required"
REPLY_QUEUED = "250 2.0.0 Ok: queued as {id}"
REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down; try again later"
REPLY_AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
REPLY_TOO_MANY_FAILURES = "421 4.7.0 Too many failed logins; closing connection"

SESSION_TIMEOUT_S = 300
AUTH_FAIL_DELAY_S = 1.0  # after a failed login, doubling per further failure from that address
AUTH_FAIL_DELAY_MAX_S = 8.0
AUTH_FAILURES_PER_SESSION = 3
AUTH_TRACKED_PEERS = 10_000


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the login is unknown, so both cases cost the same scrypt time."""
    return hash_password("relayd-no-such-user")

MAX_RECIPIENTS = 1000  # Postfix's smtpd_recipient_limit
LINE_LENGTH_LIMIT = 1024 * 1024  # accept long body lines (unwrapped HTML); RFC 5322 says 998
# An addr-spec as SMTP carries it: no spaces, controls or angle brackets, one local@domain.
_ATOM = r"[^\s<>()\[\]\\,;:\"@\x00-\x1f\x7f]+"
_ADDRESS_RE = re.compile(rf"^{_ATOM}@{_ATOM}$")
_BARE_EOL_RE = re.compile(rb"\r\n|\r|\n")


def valid_address(address: str) -> bool:
    if len(address) > 320 or not _ADDRESS_RE.match(address):
        return False
    local, domain = address.rsplit("@", 1)
    return bool(local) and len(local) <= 64 and "." not in (domain[0], domain[-1])


def normalize_line_endings(data: bytes) -> bytes:
    """Bare CR or LF becomes CRLF, as Postfix stores lines. Only CRLF.CRLF ever ends DATA
    (aiosmtpd >= 1.4.6), and the SMTP client dot-stuffs what follows, so a bare-LF
    '.' line can never start a second message upstream (SMTP smuggling)."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") == crlf and data.count(b"\r") == crlf:
        return data
    return _BARE_EOL_RE.sub(b"\r\n", data)


class Relay(Protocol):
    """What the listener needs from the service around it."""

    config: Config
    policy: SenderPolicy
    intake: Intake

    def accepted(self, route: str) -> None: ...


class Handler:
    """aiosmtpd handler hooks: policy at each command, queueing at DATA."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def handle_EHLO(self, server: SMTP, session: SmtpSession, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        # aiosmtpd reads commands one line at a time, so pipelined commands just queue up.
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(self, server: SMTP, session: SmtpSession, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if address in ("", "<>"):
            return REPLY_NULL_SENDER
        if not valid_address(address):
            return REPLY_BAD_ADDRESS
        user: ServerUser | None = getattr(session, "relayd_user", None)
        if self.relay.config.server.users and user is None and not _is_loopback(session):
            return REPLY_AUTH_REQUIRED
        decision = self.relay.policy.check(address, user)
        if decision.route is None:
            level = logging.INFO if user is None else logging.WARNING
            log.log(level, "refused sender <%s> from %s: %s", address, _peer(session),
                    decision.why)
            return decision.refusal or REPLY_INTERNAL
        envelope.relayd_route = decision.route.name  # type: ignore[attr-defined]
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return REPLY_SENDER_OK

    async def handle_RCPT(self, server: SMTP, session: SmtpSession, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if not valid_address(address):
            return REPLY_BAD_ADDRESS
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return REPLY_TOO_MANY_RCPTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return REPLY_RCPT_OK

    async def handle_DATA(self, server: SMTP, session: SmtpSession, envelope: Envelope) -> str:
        assert envelope.mail_from is not None and isinstance(envelope.original_content, bytes)
        data = normalize_line_endings(envelope.original_content)
        options = [o for o in envelope.mail_options if o.startswith(("BODY=", "SMTPUTF8"))]
        route_name: str = getattr(envelope, "relayd_route", "-")
        try:
            entry = await self.relay.intake.accept(envelope.mail_from, envelope.rcpt_tos, data,
                                                   options, _peer(session), route_name)
        except Exception as e:
            log.error("cannot store a message from %s: %s", _peer(session), e)
            return REPLY_TEMP_STORAGE
        self.relay.accepted(route_name)
        return REPLY_QUEUED.format(id=entry.id)

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %s", type(error).__name__, exc_info=error)
        return REPLY_INTERNAL


# aiosmtpd calls inspect.signature(handle_EHLO) for every connection to pick the hook's
# calling convention; a precomputed signature turns that into an attribute lookup.
Handler.handle_EHLO.__signature__ = inspect.signature(  # type: ignore[attr-defined]
    Handler.handle_EHLO)


def _peer(session: SmtpSession) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


def _is_loopback(session: SmtpSession) -> bool:
    try:
        return ipaddress.ip_address(_peer(session)).is_loopback
    except ValueError:
        return False


def _capture(server: SMTP, session: SmtpSession, envelope: Envelope, mechanism: str,
             auth_data: Any) -> AuthResult:
    """aiosmtpd's authenticator is synchronous; scrypt is too slow for the event loop. So this
    only hands the decoded login back, and RelaySMTP verifies it in a thread."""
    return AuthResult(success=True, handled=False, auth_data=auth_data)


class LoginGuard:
    """Slows down failed logins per client address (brute force) and counts them."""

    def __init__(self, on_failure: Callable[[], None]) -> None:
        self.failures: dict[str, tuple[int, float]] = {}
        self.on_failure = on_failure

    def delay(self, peer: str) -> float:
        count, _ = self.failures.get(peer, (0, 0.0))
        if not count:
            return 0.0
        return float(min(AUTH_FAIL_DELAY_MAX_S, AUTH_FAIL_DELAY_S * 2 ** (count - 1)))

    def failed(self, peer: str) -> None:
        count, _ = self.failures.get(peer, (0, 0.0))
        self.failures[peer] = (count + 1, time.monotonic())
        if len(self.failures) > AUTH_TRACKED_PEERS:  # bounded memory under a spray
            oldest = min(self.failures, key=lambda k: self.failures[k][1])
            del self.failures[oldest]
        self.on_failure()

    def succeeded(self, peer: str) -> None:
        self.failures.pop(peer, None)


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with a connection check, AUTH against [server.users] and bookkeeping
    for a clean shutdown."""

    line_length_limit = LINE_LENGTH_LIMIT

    def __init__(self, handler: Handler, *, allowed: Sequence[Any],
                 sessions: set[RelaySMTP], users: Mapping[str, ServerUser],
                 guard: LoginGuard, implicit_tls: bool = False, **kwargs: Any) -> None:
        super().__init__(handler, authenticator=_capture if users else None, **kwargs)
        self._allowed = allowed
        self._sessions = sessions
        self._users = users
        self._guard = guard
        self._implicit_tls = implicit_tls
        self._failed_here = 0
        if not users:
            self._auth_methods.clear()  # nothing to log in to: do not advertise AUTH

    # aiosmtpd finds its command and AUTH methods with dir() and inspect.getmembers() on every
    # new connection, which costs about a third of a short session. Only the smtp_ and auth_
    # names matter to it; they are fixed per class, so list them once.
    _dir_cache: dict[type, list[str]] = {}

    def __dir__(self) -> list[str]:
        names = RelaySMTP._dir_cache.get(type(self))
        if names is None:
            names = [n for n in object.__dir__(self) if n.startswith(("smtp_", "auth_"))]
            RelaySMTP._dir_cache[type(self)] = names
        return names

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's own parsing (the email package's get_angle_addr / get_addr_spec), without
        the typing-only class it defines on every call (most of the cost of MAIL and RCPT)."""
        if not arg:
            return "", ""
        address: Any
        try:
            if arg.lstrip().startswith("<"):
                address, rest = get_angle_addr(arg)
            else:
                address, rest = get_addr_spec(arg)
        except HeaderParseError:
            return None, None
        addr: str = address.addr_spec
        localpart = addr.rpartition("@")[0]
        if self.local_part_limit and len(localpart) > self.local_part_limit:
            return None, None
        return addr, rest

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._sessions.add(self)
        if self.session is not None:
            # AUTH only over TLS, or from this machine (loopback never leaves it).
            self._auth_require_tls = not (self._implicit_tls or _is_loopback(self.session))

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_LOGIN(_, args))

    async def _verify(self, result: AuthResult) -> AuthResult:
        if not result.success or not isinstance(result.auth_data, LoginPassword):
            return result
        assert self.session is not None
        peer = _peer(self.session)
        login = result.auth_data.login.decode("utf-8", "replace")
        password = result.auth_data.password.decode("utf-8", "replace")
        user = self._users.get(login)
        stored = user.password_hash.reveal() if user else _dummy_hash()
        # Verify even for unknown users, so timing does not tell which logins exist.
        ok = await asyncio.to_thread(verify_password, password, stored)
        if ok and user is not None:
            self._guard.succeeded(peer)
            self.session.relayd_user = user  # type: ignore[attr-defined]
            log.info("login %s from %s", user.name, peer)
            return AuthResult(success=True, auth_data=user.name)
        self._guard.failed(peer)
        self._failed_here += 1
        log.warning("failed login for %r from %s", login[:64], peer)
        await asyncio.sleep(self._guard.delay(peer))
        if self._failed_here >= AUTH_FAILURES_PER_SESSION:
            await self.push(REPLY_TOO_MANY_FAILURES)
            if self.transport is not None:
                self.transport.close()
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=REPLY_AUTH_FAILED)

    def connection_lost(self, error: Exception | None) -> None:
        self._sessions.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        assert self.session is not None
        peer = _peer(self.session)
        try:
            ip = ipaddress.ip_address(peer.split("%")[0])
            allowed = any(ip in net for net in self._allowed)
        except ValueError:
            allowed = False
        if not allowed:
            log.warning("refused connection from %s: not in server.allowed_clients", peer)
            await self.push(REPLY_ACCESS_DENIED)
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    def close_gracefully(self) -> None:
        """Tell an idle client we are going away (used after the drain timeout)."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(REPLY_SHUTTING_DOWN.encode() + b"\r\n")
            transport.close()


def make_protocol_factory(handler: Handler, config: Config, sessions: set[RelaySMTP],
                          guard: LoginGuard, *, starttls: ssl.SSLContext | None = None,
                          implicit_tls: bool = False) -> Callable[[], RelaySMTP]:
    """Protocols for one listener: plain with STARTTLS offered, or implicit TLS (the TLS
    layer is then the server's, and STARTTLS is not offered again)."""
    server = config.server

    def factory() -> RelaySMTP:
        return RelaySMTP(
            handler, allowed=server.allowed_clients, sessions=sessions, users=server.users,
            guard=guard, implicit_tls=implicit_tls, data_size_limit=server.max_message_size,
            enable_SMTPUTF8=True, decode_data=False, hostname=server.hostname, ident="relayd",
            tls_context=starttls, auth_require_tls=not implicit_tls, timeout=SESSION_TIMEOUT_S)

    return factory


