"""relayd's aiosmtpd protocol, one per connection (RelaySMTP): the connection check, session
limits, AUTH against [server.users], DATA read in chunks into the intake, TLS that says why a
handshake failed, and bookkeeping for a clean shutdown. The handler's hooks (the policy at each
command) are relayd.listener's; the speed-ups kept are relayd.smtpfast's.

Private names of other libraries used here; aiosmtpd's are guarded by the pin
aiosmtpd>=1.4.6,<1.5 in pyproject.toml (each as aiosmtpd 1.4.6 defines it), the standard
library's by the suite on Python 3.11 and 3.13 (.ci/run). relayd.smtpfast lists its own.
All of relayd's private-API touch points are in three tables: this one (8), relayd.smtpfast's
(5) and relayd.delivery.smtpclient's (7): 20, down from 38 before issue 24.

| private name (library)                  | used for                                           |
|-----------------------------------------|----------------------------------------------------|
| SMTP._getaddr (override)                | MAIL and RCPT refuse an unparsable address each    |
|                                         | with its own reply; the plain form without parser  |
| SMTP._reset_timeout (override; called   | when the session last spoke (SessionLimits); a     |
|   per DATA read)                        | slow DATA times out per read                       |
| SMTP._timeout_cb (override)             | 421 before closing a timed-out session (Postfix)   |
| SMTP._reader                            | DATA read in chunks (relayd.smtpdata)              |
| SMTP._original_transport, _tls_protocol | smtp_STARTTLS, aiosmtpd 1.4.6's copied, with a TLS |
|   (set by smtp_STARTTLS)                | layer that keeps the hello (tls.HelloRecorder)     |
| asyncio SSLProtocol._app_transport      | the TLS transport, as aiosmtpd's STARTTLS takes it |
| asyncio.sslproto.SSLProtocol (a module  | subclassed by tls.HelloRecorder, as aiosmtpd's     |
|   outside asyncio's documented API)     | STARTTLS builds it                                 |

Removed in issue 24: SMTP._auth_require_tls and _auth_methods set per connection (the
constructor's public auth_require_tls is off, and why_no_auth decides, for AUTH and for EHLO's
AUTH line; without [server.users] off loopback AUTH now gets Postfix's 503 5.5.1 and EHLO no
empty AUTH line, where aiosmtpd said 504 5.5.4); the email package's _header_value_parser
(aiosmtpd's own _getaddr parses what the plain form does not cover); asyncio
StreamReaderProtocol._closed read after a reset (the stream is told of an end instead); the
override of SMTP._handle_client that refused a client before the greeting (connection_made
turns it away now, before aiosmtpd starts a session: no task and no timer for it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast

from aiosmtpd.smtp import (
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
    syntax,
)

from relayd import clients
from relayd.auth.passwords import hash_password, verify_password
from relayd.config import ServerConfig, ServerUser
from relayd.escape import SHOWN_COMMAND_MAX, visible
from relayd.intake import Incoming
from relayd.limits import LoginGuard, SessionLimits
from relayd.smtpaddr import UNPARSABLE, plain_path
from relayd.smtpdata import Decoder, read_chunks
from relayd.smtpfast import FastSMTP, Tables
from relayd.tls import HelloRecorder, describe_tls_failure

# The listener's log lines keep the listener's name, as before relayd.listener was split.
log = logging.getLogger("relayd.listener")

REPLY_ACCESS_DENIED = "554 5.7.1 Access denied: your address is not allowed to use this relay"
REPLY_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
REPLY_START_DATA = "354 End data with <CR><LF>.<CR><LF>"
REPLY_NEED_RCPT = "503 5.5.1 Error: need RCPT command"
REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down; try again later"
REPLY_AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
REPLY_TOO_MANY_FAILURES = "421 4.7.0 Too many failed logins; closing connection"
REPLY_TIMEOUT = "421 4.4.2 Timeout exceeded; closing connection"
REPLY_GIVE_WAY = "421 4.7.0 Server busy: closing an idle session; try again later"
REPLY_AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
REPLY_AUTH_NOT_ENABLED = "503 5.5.1 Error: authentication not enabled"  # Postfix's words

# Postfix's and Exchange's AUTH LOGIN prompts; some printers (Xerox) hang up on aiosmtpd's
# "User Name\0". RFC 4954 leaves the text free, so the ones every client has seen win.
AUTH_LOGIN_USER_PROMPT = "Username:"
AUTH_LOGIN_PASSWORD_PROMPT = "Password:"
AUTH_FAILURES_PER_SESSION = 3
# How far the reader looks for a command's end, and how large a DATA chunk gets (commands longer
# than this get 500; DATA has no line length limit: relayd.smtpdata).
LINE_LENGTH_LIMIT = 1024 * 1024


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the login is unknown, so both cases cost the same scrypt time."""
    return hash_password("relayd-no-such-user")


class DataHandler(Protocol):
    """What RelaySMTP's DATA needs of its handler (relayd.listener.Handler)."""

    def start_data(self, session: Session, envelope: Envelope) -> Incoming: ...

    async def end_data(self, session: Session, incoming: Incoming) -> str: ...


def _capture(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
             auth_data: Any) -> AuthResult:
    """aiosmtpd's authenticator is synchronous; scrypt is too slow for the event loop. So this
    only hands the decoded login back, and RelaySMTP verifies it in a thread."""
    return AuthResult(success=True, handled=False, auth_data=auth_data)


def _shorten_commands(record: logging.LogRecord) -> bool:
    """aiosmtpd's own lines quote a client's command ("unrecognised: ..."): at most
    SHOWN_COMMAND_MAX characters of it, escaped (relayd.escape), in the daemon log."""
    if isinstance(record.args, tuple):
        record.args = tuple(visible(a, SHOWN_COMMAND_MAX) if isinstance(a, str) else
                            repr(a)[:SHOWN_COMMAND_MAX] if isinstance(a, bytes) else a
                            for a in record.args)
    return True


def _no_login_data_warning(record: logging.LogRecord) -> bool:
    """aiosmtpd's own AUTH code sets Session.login_data on every successful login, and its
    setter logs "Session.login_data is deprecated" at WARNING each time; relayd never reads
    login_data, so the line says nothing to an admin."""
    return not (isinstance(record.msg, str) and record.msg.startswith("Session.login_data"))


logging.getLogger("mail.log").addFilter(_no_login_data_warning)
logging.getLogger("mail.log").addFilter(_shorten_commands)


class RelaySMTP(FastSMTP):
    """aiosmtpd's SMTP with a connection check, session limits, AUTH against [server.users]
    and bookkeeping for a clean shutdown (the private names it uses: the module docstring)."""

    line_length_limit = LINE_LENGTH_LIMIT
    AuthLoginUsernameChallenge = AUTH_LOGIN_USER_PROMPT
    AuthLoginPasswordChallenge = AUTH_LOGIN_PASSWORD_PROMPT

    def __init__(self, handler: DataHandler, *, allowed: Sequence[Any],
                 sessions: set[RelaySMTP], users: Mapping[str, ServerUser],
                 guard: LoginGuard, limits: SessionLimits, server: ServerConfig,
                 implicit_tls: ssl.SSLContext | None = None, tables: Tables | None = None,
                 **kwargs: Any) -> None:
        super().__init__(handler, tables=tables, authenticator=_capture, **kwargs)
        self._allowed = allowed
        self._sessions = sessions
        self._users = users
        self._guard = guard
        self._limits = limits
        self._server = server
        self._implicit_tls = implicit_tls is not None
        self._implicit_context = implicit_tls  # the handshake is this protocol's to start
        self._failed_here = 0
        self._loopback = False
        self.client = ""

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's own parsing (the email package's get_angle_addr / get_addr_spec), but for
        the plain `<local@domain>` form a regular expression that gives the parser's answer
        (tests/test_listener_input.py compares them) at a tenth of its cost: aiosmtpd defines a
        typing-only class on every call, most of the cost of MAIL and RCPT.
        What the parser cannot read becomes UNPARSABLE for the handler to refuse with MAIL's
        or RCPT's own reply: aiosmtpd gives (None, None) for it (relayd sets no
        local_part_limit, the other reason it has), and the parser raises IndexError or
        AttributeError, not only HeaderParseError, on input such as `<`."""
        if not arg:
            return "", ""
        plain = plain_path(arg)
        if plain is not None:
            if self.local_part_limit and len(plain[0].rpartition("@")[0]) > self.local_part_limit:
                return None, None
            return plain
        try:
            address, rest = super()._getaddr(arg)
        except (IndexError, AttributeError, ValueError):
            return UNPARSABLE, ""
        if address is None and not self.local_part_limit:
            return UNPARSABLE, ""
        return address, rest

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._implicit_context is not None:
            self._start_implicit_tls(transport)  # then called again with the TLS transport
            return
        if self._original_transport is not None:  # called again after STARTTLS
            super().connection_made(transport)
            return
        self.client = clients.host(transport.get_extra_info("peername"))
        refusal = self._admission()
        if refusal is not None:
            # Turned away before any SMTP session exists (no task, no timer): the reply,
            # and the connection closed once it is written.
            self._turned_away = True
            cast(asyncio.WriteTransport, transport).write(refusal.encode() + b"\r\n")
            transport.close()
            return
        self._loopback = clients.is_loopback(self.client)
        self._sessions.add(self)  # counted only once admitted
        super().connection_made(transport)

    _turned_away = False  # refused in connection_made: aiosmtpd never saw the connection

    def _admission(self) -> str | None:
        """The reply that turns this client away before the greeting, or None to let it in:
        server.allowed_clients, then the session limits (relayd.limits)."""
        peer = self.client
        ip = clients.ip(peer)
        if ip is None or not any(ip in net for net in self._allowed):
            log.warning("refused connection from %s: not in server.allowed_clients", peer)
            return REPLY_ACCESS_DENIED
        refusal = self._limits.refusal(self._sessions, peer)
        if refusal is not None:
            self._limits.refused(peer, refusal)
        return refusal

    def _start_implicit_tls(self, transport: asyncio.BaseTransport) -> None:
        """The TLS layer of an implicit-TLS port, set up here rather than by the server
        (create_server(ssl=...)), so that a failed handshake is one WARNING line saying what
        the client offered; asyncio's own says nothing outside debug mode."""
        context, self._implicit_context = self._implicit_context, None
        assert context is not None
        client = clients.host(transport.get_extra_info("peername"))
        # cast, not isinstance: uvloop's transports are not asyncio's classes (relayd.loop).
        tls, waiter = self._layer_tls(cast(asyncio.Transport, transport), context)

        def done(future: asyncio.Future[None]) -> None:
            error = None if future.cancelled() else future.exception()
            if error is not None:
                # A connection that sends nothing (a port check) is not worth a warning.
                log.log(logging.WARNING if tls.hello else logging.INFO,
                        "TLS handshake with %s failed: %s", client,
                        describe_tls_failure(tls.hello, error, self._server,
                                             "on the implicit-TLS port"))

        waiter.add_done_callback(done)

    def _layer_tls(self, transport: asyncio.Transport, context: ssl.SSLContext
                   ) -> tuple[HelloRecorder, asyncio.Future[None]]:
        """A server-side TLS layer between `transport` and this protocol, which keeps the
        client's first bytes (describe_tls_failure); the future completes with the handshake."""
        waiter: asyncio.Future[None] = self.loop.create_future()
        tls = HelloRecorder(self.loop, self, context, waiter, server_side=True)
        transport.set_protocol(tls)
        tls.connection_made(transport)
        return tls, waiter

    active_at = 0.0  # loop time of the session's last command or DATA read

    def idle_for(self) -> float:
        """Seconds since the last command, or 0 while a transaction is in progress (a
        session idle mid-transaction is a client at work, not one to close first)."""
        envelope = self.envelope
        if envelope is not None and envelope.mail_from is not None:
            return 0.0
        return self.loop.time() - self.active_at

    def give_way(self) -> None:
        """Closed to admit a new session (server.max_sessions reached; SessionLimits)."""
        transport = self._open_transport()
        if transport is not None:
            transport.write(REPLY_GIVE_WAY.encode() + b"\r\n")
            transport.close()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's timer, restarted at every command (and here every DATA read), noting
        when for idle_for."""
        self.active_at = self.loop.time()
        super()._reset_timeout(duration)

    def _timeout_cb(self) -> None:
        """Tell the client why before closing an idle or slow session (server.session_timeout),
        as Postfix does."""
        transport = self._open_transport()
        if transport is not None:
            log.info("session from %s timed out", self.client)
            transport.write(REPLY_TIMEOUT.encode() + b"\r\n")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def why_no_auth(self) -> str | None:
        """Why AUTH is not offered on this connection now (its reply), None when it is: only
        over TLS or from this machine (loopback never leaves it), and from elsewhere only
        when there are [server.users] to log in as. EHLO leaves AUTH out where this refuses
        it (relayd.listener.Handler.handle_EHLO)."""
        if not (self._loopback or self._implicit_tls
                or (self.session is not None and self.session.ssl is not None)):
            return REPLY_AUTH_NEEDS_TLS
        if not self._users and not self._loopback:
            return REPLY_AUTH_NOT_ENABLED
        return None

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        """Mechanism names are case-insensitive (RFC 4954); .NET's SmtpClient sends
        `AUTH login`, which aiosmtpd's exact lookup refuses."""
        if arg:
            parts = arg.split(maxsplit=1)
            arg = " ".join([parts[0].upper(), *parts[1:]])
        session = self.session
        refusal = self.why_no_auth()
        if refusal is not None and session is not None and session.host_name:
            await self.push(refusal)
            return
        if session is None or session.extended_smtp or not session.host_name:
            await super().smtp_AUTH(arg)
            return
        # AUTH after HELO (old printers and scanners): Postfix takes it, and so does relayd;
        # aiosmtpd answers "500 command 'AUTH' not recognized". Only for this command: the
        # session stays a HELO session (no ESMTP parameters on MAIL FROM).
        session.extended_smtp = True
        try:
            await super().smtp_AUTH(arg)
        finally:
            session.extended_smtp = False

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_LOGIN(_, args))

    async def _verify(self, result: AuthResult) -> AuthResult:
        if not result.success or not isinstance(result.auth_data, LoginPassword):
            return result
        assert self.session is not None
        peer = clients.address(self.session)
        if not self._users and clients.on_loopback(self.session):
            # Many apps always send the login typed into their settings. Without
            # [server.users] loopback sends without one anyway, so taking it grants nothing.
            log.info("login from %s accepted without checking: no [server.users], and "
                     "loopback needs no login", peer)
            return AuthResult(success=True, auth_data=None)
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

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's checks and replies, then the message read in chunks into the intake as it
        arrives (relayd.smtpdata), instead of line by line into memory."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push(REPLY_NEED_RCPT)
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        handler = cast(DataHandler, self.event_handler)
        incoming = handler.start_data(self.session, self.envelope)
        await self.push(REPLY_START_DATA)
        decoder = Decoder()
        limit = self.data_size_limit
        received = 0
        try:
            async for raw in read_chunks(self._reader, self.line_length_limit):
                self._reset_timeout()  # a slow client times out per read, as in Postfix
                received += len(raw)
                if limit and received > limit:
                    incoming.discard()  # read on to the end, as RFC 5321 4.2.5 implies
                    continue
                incoming.write(decoder.feed(raw))
            incoming.write(decoder.finish())
        except (asyncio.IncompleteReadError, asyncio.CancelledError) as e:
            # The client went away (aiosmtpd cancels the session at EOF), or relayd stops.
            incoming.discard()
            log.info("connection from %s lost during DATA; nothing was queued", self.client)
            if isinstance(e, asyncio.CancelledError):
                raise
            if self.transport is not None:
                self.transport.close()
            return
        except BaseException:
            incoming.discard()
            raise
        if limit and received > limit:
            log.info("refused a message from %s: larger than server.max_message_size (%d)",
                     self.client, limit)
            reply = REPLY_TOO_BIG
        else:
            reply = await handler.end_data(self.session, incoming)
        self.envelope = Envelope()  # as after aiosmtpd's own DATA
        await self.push(reply)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd 1.4.6's, with a TLS layer that keeps the client's first bytes so that a
        failed handshake is one WARNING line saying what the client offered."""
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        if not self.tls_context:
            await self.push("454 TLS not available")
            return
        await self.push("220 Ready to start TLS")
        self._original_transport = self.transport
        assert self._original_transport is not None
        tls, waiter = self._layer_tls(cast(asyncio.Transport, self._original_transport),
                                      self.tls_context)
        self._tls_protocol = tls
        self.transport = tls._app_transport
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("TLS handshake with %s failed: %s", self.client,
                        describe_tls_failure(tls.hello, error, self._server))
            raise TLSSetupException() from error

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            return ""  # already logged; aiosmtpd closes the connection and sends nothing
        return await super().handle_exception(error)

    def connection_lost(self, error: Exception | None) -> None:
        """A client's reset ends the session as its EOF does: the stream is told of an end, not
        of the error. The session's task is cancelled either way; the error would only stay
        on the stream's "closed" future, which nobody awaits, and asyncio would log "Future
        exception was never retrieved" with a traceback when it is collected."""
        if self._turned_away:
            return
        self._sessions.discard(self)
        super().connection_lost(None)

    _spoke = False  # the client has sent something on this connection

    def data_received(self, data: bytes) -> None:
        """A TLS ClientHello as the first bytes on a plain port is a client set up for
        implicit TLS: one line that says so and names the fix, and the connection closed,
        rather than its binary hello parsed as SMTP commands and quoted in the log."""
        if not self._spoke:
            self._spoke = True
            if data[:2] == b"\x16\x03" and not self._implicit_tls:
                log.warning("client %s started a TLS handshake on a plain SMTP port: use a "
                            "listen_tls port or STARTTLS", self.client)
                transport = self._open_transport()
                if transport is not None:
                    transport.close()
                return
        super().data_received(data)

    def eof_received(self) -> bool:
        """The client ended its side: aiosmtpd cancels the session's task and keeps the
        transport open for a reply nobody will write. Its task closes the transport on the
        way out, but only once it has run: uvloop can deliver an EOF that was waiting in the
        listen backlog before the task's first step, and the connection then stayed half
        open, a descriptor and a session slot, until relayd stopped. Close it here: after an
        EOF there is nothing left to say (Postfix's smtpd ends the session too)."""
        if not self._turned_away:
            super().eof_received()
        return False

    def close_gracefully(self) -> None:
        """Tell an idle client we are going away (used after the drain timeout)."""
        transport = self._open_transport()
        if transport is not None:
            transport.write(REPLY_SHUTTING_DOWN.encode() + b"\r\n")
            transport.close()

    def _open_transport(self) -> asyncio.WriteTransport | None:
        """The session's transport while it is open. Told by is_closing(), not isinstance:
        uvloop's transports are not asyncio's classes (relayd.loop)."""
        transport = cast(asyncio.WriteTransport | None, self.transport)
        return None if transport is None or transport.is_closing() else transport
