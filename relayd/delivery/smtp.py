"""The SMTP upstream (aiosmtplib): STARTTLS or implicit TLS, password or XOAUTH2, one
connection reused for consecutive messages, a result for each recipient."""

from __future__ import annotations

import functools
import logging
import re
import ssl
from collections.abc import Callable, Sequence

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX

from relayd.auth import TokenProvider
from relayd.auth.registry import make_token_provider
from relayd.config import Config, RouteConfig
from relayd.delivery.base import OutboundMessage, RecipientResult, Session, Status, Upstream
from relayd.delivery.doubt import SMTP_DUPLICATE_RISK
from relayd.delivery.smtpclient import PipeliningSMTP, UnansweredEndOfData
from relayd.errors import (
    AuthenticationError,
    InDoubtError,
    PermanentDeliveryError,
    TransientDeliveryError,
    UpstreamUnavailableError,
)

log = logging.getLogger(__name__)

# Scopes for XOAUTH2 (FIELD-NOTES): Google's one scope; Microsoft delegated vs app-only.
GOOGLE_SCOPES = ("https://mail.google.com/",)
MICROSOFT_DELEGATED_SCOPES = ("https://outlook.office.com/SMTP.Send",)
MICROSOFT_APP_SCOPES = ("https://outlook.office365.com/.default",)


def result_for(code: int, text: str) -> RecipientResult:
    """A reply code as an outcome: 2xx delivered, 4xx deferred, 5xx (and nonsense) failed."""
    if 200 <= code < 300:
        return RecipientResult.smtp(Status.DELIVERED, code, text)
    if 400 <= code < 500:
        return RecipientResult.smtp(Status.DEFERRED, code, text)
    return RecipientResult.smtp(Status.FAILED, code, text)


def error_for(code: int, text: str) -> TransientDeliveryError | PermanentDeliveryError:
    if 400 <= code < 500:
        return TransientDeliveryError(text, code)
    return PermanentDeliveryError(text, code)


class SmtpUpstream(Upstream):
    def __init__(self, route: RouteConfig, config: Config) -> None:
        super().__init__(route, config)
        self.smtp = route.smtp
        self.tls_context: ssl.SSLContext | None = None
        if self.smtp.tls != "none":
            self.tls_context = ssl.create_default_context(
                cafile=str(route.ca_file) if route.ca_file else None)
        self.tokens: TokenProvider | None = None
        oauth = self.smtp.oauth
        if oauth is not None:  # auth = "xoauth2"
            if oauth.provider == "google":
                scopes = GOOGLE_SCOPES
            elif route.delegated:
                scopes = MICROSOFT_DELEGATED_SCOPES
            else:
                scopes = MICROSOFT_APP_SCOPES
            self.tokens = make_token_provider(route, config, scopes)
        # `relayd send-test` sets this to print each step (connect, TLS, EHLO, AUTH).
        self.trace: Callable[[str], None] | None = None

    def session(self) -> Session:
        return SmtpSession(self)

    def token_expiries(self) -> dict[str, float]:
        return self.tokens.expiries() if self.tokens is not None else {}

    def account_for(self, message: OutboundMessage) -> str:
        """Who the connection authenticates as: the username, a fixed mailbox, or the sender
        (a bounce authenticates as the mailbox it returns to)."""
        return self._account(message.sender, message.recipients)

    def _account(self, sender: str, recipients: Sequence[str]) -> str:
        smtp = self.smtp
        if smtp.auth == "password":
            return smtp.username or ""
        if smtp.mailbox and smtp.mailbox != "sender":
            return smtp.mailbox
        if smtp.username:
            return smtp.username
        return sender or (recipients[0] if recipients else "")

    def sending_mailbox(self, sender: str, recipients: Sequence[str]) -> str | None:
        """The account the connection signs in as submits the message, and is the mailbox
        the provider counts (and restricts); without a login, the sender."""
        return self._account(sender, recipients) or None


class SmtpSession(Session):
    def __init__(self, upstream: SmtpUpstream) -> None:
        self.up = upstream
        self.route = upstream.route
        self.smtp = upstream.smtp
        self.client: PipeliningSMTP | None = None
        self.account = ""

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        try:
            if client.is_connected:
                await client.quit(timeout=5)
        except (aiosmtplib.SMTPException, OSError):
            client.close()

    async def _connect(self, account: str) -> PipeliningSMTP:
        smtp = self.smtp
        client = PipeliningSMTP(
            hostname=smtp.host, port=smtp.port, timeout=self.route.timeout_s,
            use_tls=smtp.tls == "implicit", start_tls=smtp.tls == "starttls",
            tls_context=self.up.tls_context, local_hostname=self.up.config.server.hostname)
        trace = self.up.trace
        try:
            banner = await client.connect()
            if trace is not None:
                trace(f"connected to {smtp.host}:{smtp.port}: {banner.code} {banner.message}")
                if smtp.tls != "none":
                    trace(f"{'STARTTLS' if smtp.tls == 'starttls' else 'implicit TLS'}: "
                          f"{_tls_info(client)}")
        except aiosmtplib.SMTPConnectResponseError as e:
            raise UpstreamUnavailableError(
                f"{smtp.host}:{smtp.port} refused the connection: {e.message}", e.code) from e
        except (aiosmtplib.SMTPException, OSError) as e:
            raise UpstreamUnavailableError(
                f"cannot connect to {smtp.host}:{smtp.port}: {_why(e)}") from e
        try:
            if client.is_ehlo_or_helo_needed:
                # Extensions (SMTPUTF8, 8BITMIME, SIZE) are known only after EHLO.
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await client.helo()
            if trace is not None:
                trace("EHLO: " + " ".join(sorted(client.esmtp_extensions)))
            if smtp.auth == "password":
                assert smtp.password is not None
                said = await client.login(account, smtp.password.reveal())
                if trace is not None:
                    trace(f"AUTH as {account}: {said.code} {said.message}")
            elif smtp.auth == "xoauth2":
                await self._xoauth2(client, account)
                if trace is not None:
                    trace(f"AUTH XOAUTH2 as {account}: accepted")
        except BaseException:
            client.close()
            raise
        return client

    async def _xoauth2(self, client: aiosmtplib.SMTP, account: str) -> None:
        """Authenticate with a token; a 535 may mean it expired early: renew once, then defer."""
        tokens = self.up.tokens
        assert tokens is not None
        for attempt in (1, 2):
            token = await tokens.token(account)
            try:
                await client.auth_xoauth2(account, token)
                return
            except aiosmtplib.SMTPAuthenticationError as e:
                tokens.invalidate(account)
                if attempt == 2:
                    raise AuthenticationError(
                        f"{self.smtp.host} refused the OAuth token for {account}: {e.message}",
                        e.code) from e
            except aiosmtplib.SMTPException as e:
                raise TransientDeliveryError(f"XOAUTH2 failed: {_why(e)}") from e

    async def deliver(self, message: OutboundMessage) -> dict[str, RecipientResult]:
        account = self.up.account_for(message)
        reused = self.client is not None and self.client.is_connected and account == self.account
        if not reused:
            await self.close()
            self.client = await self._connect_mapped(account)
            self.account = account
        try:
            return await self._transaction(message)
        except UnansweredEndOfData as e:
            # Not once more on a new connection, as below: the server may have the message.
            raise await self._in_doubt(e) from e
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as e:
            await self.close()
            if not reused:
                raise TransientDeliveryError(f"connection lost: {_why(e)}") from e
            # A reused connection may have been closed by the server while idle: once more.
            self.client = await self._connect_mapped(account)
            self.account = account
            try:
                return await self._transaction(message)
            except UnansweredEndOfData as e2:
                raise await self._in_doubt(e2) from e2
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as e2:
                await self.close()
                raise TransientDeliveryError(f"connection lost: {_why(e2)}") from e2
        except aiosmtplib.SMTPTimeoutError as e:
            await self.close()
            raise TransientDeliveryError(f"timeout talking to {self.smtp.host}: {e}") from e
        except aiosmtplib.SMTPException as e:
            await self.close()
            raise TransientDeliveryError(f"SMTP error: {_why(e)}") from e

    async def _in_doubt(self, e: UnansweredEndOfData) -> InDoubtError:
        await self.close()
        return InDoubtError(f"4.4.2 {SMTP_DUPLICATE_RISK} ({self.smtp.host}: {e.message})")

    async def _connect_mapped(self, account: str) -> PipeliningSMTP:
        try:
            return await self._connect(account)
        except aiosmtplib.SMTPAuthenticationError as e:
            raise AuthenticationError(
                f"{self.smtp.host} refused the credentials for {account}: {e.code} {e.message}",
                e.code) from e
        except aiosmtplib.SMTPTimeoutError as e:
            raise UpstreamUnavailableError(
                f"timeout setting up {self.smtp.host}: {_why(e)}") from e
        except aiosmtplib.SMTPResponseException as e:
            # EHLO, STARTTLS or AUTH refused: a setup problem, never the message's fault.
            raise TransientDeliveryError(f"{self.smtp.host}: {e.message}", e.code) from e
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as e:
            raise UpstreamUnavailableError(f"cannot set up {self.smtp.host}: {_why(e)}") from e

    async def _transaction(self, message: OutboundMessage) -> dict[str, RecipientResult]:
        client = self.client
        assert client is not None
        options, encoding = self._mail_options(client, message)
        mail = _command_line(b"MAIL FROM:", message.sender, options, encoding)
        if mail is None:
            # Nothing was sent: the connection is still in step.
            raise PermanentDeliveryError(f"5.1.7 the sender address cannot be encoded for "
                                         f"{self.smtp.host}", 553)
        results: dict[str, RecipientResult] = {}
        sent: list[str] = []
        lines: list[bytes] = []
        for rcpt in message.recipients:
            line = _command_line(b"RCPT TO:", rcpt, (), encoding)
            if line is None:
                # This recipient only; the rest go on.
                why = ("5.1.3 the recipient address is not valid UTF-8" if encoding == "utf-8"
                       else f"5.6.7 the recipient address is not ASCII and {self.smtp.host} "
                       "does not support SMTPUTF8")
                results[rcpt] = RecipientResult.smtp(Status.FAILED, 553, why)
                continue
            sent.append(rcpt)
            lines.append(line)
        if not sent:
            return results
        body = message.data if message.spooled is None else message.spooled.chunks()
        replies = await client.transaction(mail, lines, body)
        if replies.mail.code != 250:
            await self._rset()
            if replies.mail.code == 421:
                await self.close()
            raise error_for(replies.mail.code, replies.mail.message)
        taken: list[str] = []
        for rcpt, said in zip(sent, replies.rcpts, strict=True):
            if said.code in (250, 251):
                taken.append(rcpt)
            else:
                results[rcpt] = result_for(said.code, said.message)
        if not taken:
            await self._rset()
            return results
        final = replies.final if replies.final is not None else replies.data
        assert final is not None
        if replies.final is None or final.code >= 300:
            await self._rset()
        results.update({r: result_for(final.code, final.message) for r in taken})
        return results

    def _mail_options(self, client: PipeliningSMTP,
                      message: OutboundMessage) -> tuple[list[str], str]:
        options: list[str] = []
        requested = {o.upper() for o in message.mail_options}
        # A non-ASCII recipient alone does not need the whole message to fail where SMTPUTF8
        # is missing: that recipient fails (553 5.6.7) and the others are delivered.
        utf8_rcpts = not all(a.isascii() for a in message.recipients)
        needs_utf8 = "SMTPUTF8" in requested or not message.sender.isascii()
        if needs_utf8 or (utf8_rcpts and client.supports_extension("smtputf8")):
            if not client.supports_extension("smtputf8"):
                raise PermanentDeliveryError(
                    f"{self.smtp.host} does not support SMTPUTF8, which this message's "
                    "addresses need", 553)
            options.append("SMTPUTF8")
        if "BODY=8BITMIME" in requested and client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if client.supports_extension("size"):
            options.append(f"SIZE={message.size}")
        return options, "utf-8" if "SMTPUTF8" in options else "ascii"

    async def _rset(self) -> None:
        client = self.client
        if client is None:
            return
        try:
            await client.rset()
        except (aiosmtplib.SMTPException, OSError):
            await self.close()


# aiosmtplib's quote_address runs the email package's address parser (about 20 us); the same
# few senders and recipients come back message after message.
_quoted = functools.lru_cache(maxsize=4096)(quote_address)


def _command_line(verb: bytes, address: str, options: Sequence[str],
                  encoding: str) -> bytes | None:
    """`MAIL FROM:<a> OPTS` or `RCPT TO:<a>` with its CRLF, as aiosmtplib's mail() and rcpt()
    build them; None when the address cannot be encoded (or would smuggle a control)."""
    try:
        addr = _quoted(address).encode(encoding)
    except UnicodeEncodeError:
        return None
    if COMMAND_INJECTION_REGEX.search(addr):
        return None
    return b" ".join([verb + addr, *(o.encode("ascii") for o in options)]) + b"\r\n"


def _tls_info(client: aiosmtplib.SMTP) -> str:
    transport = client.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return "not negotiated"
    cipher = ssl_object.cipher()
    peer = ssl_object.getpeercert() or {}
    subject = dict(x[0] for x in peer.get("subject", ()))
    name = subject.get("commonName", "")
    return (f"{ssl_object.version()}, {cipher[0] if cipher else '?'}, certificate verified"
            + (f" for {name}" if name else ""))


_CONNECTING_RE = re.compile(r"^Error connecting to \S+ on port \d+:?\s*")


def _why(e: BaseException) -> str:
    """The error in one line, with its cause: aiosmtplib's "Error connecting to host on port
    N:" alone does not tell an admin whether it was refused, timed out or a TLS failure."""
    text = " ".join((str(e) or type(e).__name__).split())
    # aiosmtplib's "Error connecting to H on port P: ..." repeats what relayd's own message
    # says before it ("cannot connect to H:P: "): keep what follows it
    text = _CONNECTING_RE.sub("", text) or text
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text.rstrip(':')}: {' '.join(str(cause).split())}"
    return text
