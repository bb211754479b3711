"""The SMTP listener: aiosmtpd's handler hooks (the policy at MAIL, RCPT and DATA: the sender
policy, the recipients, queueing), and the protocols for each listening socket (relayd.smtpd).
It never delivers; DATA is answered 250 only once the message is on stable storage."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Protocol

from aiosmtpd.smtp import SMTP, Envelope, Session

from relayd import clients
from relayd.config import Config, ServerUser
from relayd.escape import SHOWN_COMMAND_MAX, visible
from relayd.intake import Incoming, Intake
from relayd.limits import LoginGuard, SessionLimits
from relayd.policy import SenderPolicy
from relayd.router import recipient_allowed
from relayd.smtpaddr import address_refusal
from relayd.smtpd import RelaySMTP
from relayd.smtpfast import Tables

# What the service builds a listener from (relayd.service).
__all__ = ["Handler", "LoginGuard", "Relay", "RelaySMTP", "make_protocol_factory"]

log = logging.getLogger(__name__)

# Replies are constants with enhanced status codes; nothing from an exception reaches a client.
REPLY_SENDER_OK = "250 2.1.0 Sender ok"
REPLY_RCPT_OK = "250 2.1.5 Recipient ok"
REPLY_RCPT_NOT_ALLOWED = ("550 5.7.1 Recipient not allowed through route {route} "
                          "(routes.{route}.recipients)")
REPLY_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
REPLY_NULL_SENDER_ONE_RCPT = "452 4.5.3 Only one recipient for a null sender"
REPLY_TEMP_STORAGE = "451 4.3.0 Temporary problem storing the message; try again later"
REPLY_INTERNAL = "451 4.3.0 Temporary internal problem; try again later"
REPLY_AUTH_REQUIRED = "530 5.7.0 Authentication required"
REPLY_QUEUED = "250 2.0.0 Ok: queued as {id}"

MAX_RECIPIENTS = 1000  # Postfix's smtpd_recipient_limit


class Relay(Protocol):
    """What the listener needs from the service around it."""

    config: Config
    policy: SenderPolicy
    intake: Intake

    def stored(self, route: str) -> None: ...


class Handler:
    """aiosmtpd handler hooks: policy at each command, queueing at DATA."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        # AUTH only where it is offered (RelaySMTP.why_no_auth: over TLS or from loopback, and
        # with logins to check), and never without a mechanism ("250-AUTH ": curl gives up);
        # aiosmtpd lists it on every connection.
        offered = not isinstance(server, RelaySMTP) or server.why_no_auth() is None
        kept = [r for r in responses[:-1]
                if not r.startswith("250-AUTH") or (offered and r.rstrip() != "250-AUTH")]
        # aiosmtpd reads commands one line at a time, so pipelined commands just queue up.
        return [*kept, "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        null = address == "<>"  # aiosmtpd's spelling of the null reverse-path
        if not null:
            refusal = address_refusal(address, envelope.smtp_utf8, sender=True)
            if refusal is not None:
                log.info("refused sender from %s: %s", clients.address(session), refusal[4:])
                return refusal
        user: ServerUser | None = getattr(session, "relayd_user", None)
        loopback = clients.on_loopback(session)
        if self.relay.config.server.users and user is None and not loopback:
            return REPLY_AUTH_REQUIRED
        decision = self.relay.policy.check("" if null else address, user, loopback=loopback)
        if decision.route is None:
            level = logging.INFO if user is None else logging.WARNING
            log.log(level, "refused sender <%s> from %s: %s",
                    "" if null else visible(address, SHOWN_COMMAND_MAX), clients.address(session),
                    decision.why)
            return decision.refusal or REPLY_INTERNAL
        envelope.relayd_route = decision.route.name  # type: ignore[attr-defined]
        envelope.relayd_pin = decision.pin  # type: ignore[attr-defined]
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return REPLY_SENDER_OK

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        refusal = address_refusal(address, envelope.smtp_utf8, sender=False)
        if refusal is not None:
            log.info("refused recipient from %s: %s", clients.address(session), refusal[4:])
            return refusal
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return REPLY_TOO_MANY_RCPTS
        if envelope.rcpt_tos and envelope.mail_from == "<>":
            # A delivery status notification goes to one address (RFC 3464); more would make
            # the null sender, which no From check ties to anyone, a way to mail many.
            log.info("refused recipient <%s> from %s: a null sender takes one recipient",
                     visible(address, SHOWN_COMMAND_MAX), clients.address(session))
            return REPLY_NULL_SENDER_ONE_RCPT
        route = self.relay.config.routes.get(getattr(envelope, "relayd_route", ""))
        if route is not None and not recipient_allowed(route, address):
            log.info("refused recipient <%s> from %s: not in routes.%s.recipients",
                     visible(address, SHOWN_COMMAND_MAX), clients.address(session), route.name)
            return REPLY_RCPT_NOT_ALLOWED.format(route=route.name)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return REPLY_RCPT_OK

    def start_data(self, session: Session, envelope: Envelope) -> Incoming:
        """At DATA: where the message goes as it arrives."""
        assert envelope.mail_from is not None
        options = [o for o in envelope.mail_options if o.startswith(("BODY=", "SMTPUTF8"))]
        route_name: str = getattr(envelope, "relayd_route", "-")
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from
        # The queue manager finds a message's route from its sender, unless the route is
        # recorded with it (a null sender has nothing to look up).
        pinned = route_name if getattr(envelope, "relayd_pin", False) else None
        user: ServerUser | None = getattr(session, "relayd_user", None)
        return self.relay.intake.begin(sender, envelope.rcpt_tos, options, clients.address(session),
                                       route_name, pinned_route=pinned,
                                       login=user.name if user else "")

    async def end_data(self, session: Session, incoming: Incoming) -> str:
        """At the end of DATA: 250 once the message is durable."""
        try:
            entry = await incoming.finish()
        except Exception as e:
            log.error("cannot store a message from %s: %s", clients.address(session), e)
            return REPLY_TEMP_STORAGE
        self.relay.stored(incoming.route)
        return REPLY_QUEUED.format(id=entry.id)

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %s", type(error).__name__, exc_info=error)
        return REPLY_INTERNAL


def make_protocol_factory(handler: Handler, config: Config, sessions: set[RelaySMTP],
                          guard: LoginGuard, *, starttls: ssl.SSLContext | None = None,
                          implicit_tls: ssl.SSLContext | None = None) -> Callable[[], RelaySMTP]:
    """Protocols for one listener: plain with STARTTLS offered, or implicit TLS (each
    protocol then starts TLS itself on a plain server socket, and STARTTLS is not offered
    again). `sessions` is shared by all listeners, so server.max_sessions counts them all."""
    server = config.server
    limits = SessionLimits(server)
    tables: Tables | None = None  # from the listener's first protocol

    def factory() -> RelaySMTP:
        nonlocal tables
        protocol = RelaySMTP(
            handler, allowed=server.allowed_clients, sessions=sessions, users=server.users,
            guard=guard, limits=limits, server=server, implicit_tls=implicit_tls,
            data_size_limit=server.max_message_size, enable_SMTPUTF8=True, decode_data=False,
            hostname=server.hostname, ident="relayd", tls_context=starttls,
            auth_require_tls=False,  # RelaySMTP decides where AUTH is offered
            timeout=server.session_timeout_s,
            loop=asyncio.get_running_loop(),  # aiosmtpd's own lookup goes through warnings
            tables=tables)
        if tables is None:
            tables = Tables(protocol)
        return protocol

    return factory
