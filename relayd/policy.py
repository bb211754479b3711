"""The sender policy: whether MAIL FROM is accepted, in any process, without an upstream client.

It answers from the config and the token store alone: the route the sender maps to, whether the
client's login may use that address, and, for a delegated OAuth route, whether that account has
signed in (one stat of its token file). Listener workers use it as the main process does, so
none of them builds an EWS or Graph client just to answer MAIL FROM.
"""

from __future__ import annotations

from dataclasses import dataclass

from relayd.config import Address, Config, RouteConfig, ServerUser
from relayd.delivery.mime import fixed_mailbox
from relayd.router import Router, matches_any

REPLY_UNKNOWN_SENDER = ("550 5.7.1 Sender address not allowed: no route is configured for it "
                        "(relayd is not an open relay)")
REPLY_SENDER_NOT_YOURS = "550 5.7.1 Sender address not allowed for your login"
REPLY_NULL_SENDER = "550 5.7.1 Null sender not accepted from clients"
REPLY_NULL_SENDER_NOT_YOURS = "550 5.7.1 Null sender not allowed for your login"
NULL_SENDER_PATTERN = "<>"  # in a [server.users] login's senders: it may send MAIL FROM:<>


@dataclass(frozen=True)
class Decision:
    route: RouteConfig | None  # the route the message will take, when accepted
    refusal: str | None  # the SMTP reply when refused
    why: str = ""  # for the log line of a refusal
    pin: bool = False  # record the route with the message: its sender does not find it


class SenderPolicy:
    """Built once per config (and per process); immutable."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.router = Router(config.routes)

    def check(self, sender: str, user: ServerUser | None, *, loopback: bool = False
              ) -> Decision:
        """`sender` is "" for the null reverse-path (MAIL FROM:<>); `loopback`: the client
        is on this machine."""
        if not sender:
            return self.null_sender(user, loopback)
        route = self.router.lookup(sender)
        if route is None:
            return Decision(None, REPLY_UNKNOWN_SENDER, "no route")
        if user is not None and not matches_any(user.senders, sender):
            return Decision(None, REPLY_SENDER_NOT_YOURS, f"not in the senders of user {user.name}")
        refusal = self.not_signed_in(route, sender)
        if refusal:
            return Decision(None, refusal, "not signed in")
        return Decision(route, None)

    def null_sender(self, user: ServerUser | None, loopback: bool) -> Decision:
        """Null-sender mail (delivery status notifications a front MTA hands on) goes through
        server.null_sender_route; without it, it is refused. A null sender can claim to be
        anyone (the From is not checked against it), so it is taken only from a login whose
        senders include "<>" or, on a relay without [server.users], from loopback; with
        [server.users], a loopback client without a login is refused too (it could be any
        local process). The listener takes one recipient with it (a DSN goes to one
        address). Its route is recorded with the message, since it matches no pattern."""
        name = self.config.server.null_sender_route
        route = self.config.routes.get(name) if name else None
        if route is None:
            return Decision(None, REPLY_NULL_SENDER, "null sender and no server.null_sender_route")
        if user is not None:
            if NULL_SENDER_PATTERN not in user.senders:
                return Decision(None, REPLY_NULL_SENDER_NOT_YOURS,
                                f'null sender and "<>" not in the senders of user {user.name}')
        elif self.config.server.users or not loopback:
            return Decision(None, REPLY_NULL_SENDER, "null sender without a login that allows it")
        return Decision(route, None, pin=True)

    def not_signed_in(self, route: RouteConfig, sender: str) -> str | None:
        """A delegated route sends only as accounts that signed in: refuse others at MAIL FROM
        rather than queue mail that can only defer until it expires."""
        if not sender or not route.delegated:
            return None
        # Imported here: the token store pulls in cryptography, which a relay without
        # delegated routes (or a listener worker) need not load.
        from relayd.auth.tokencache import TokenStore

        account = fixed_mailbox(route) or sender
        if TokenStore(self.config).exists(route.name, account.lower()):
            return None
        command = f"`relayd auth login {route.name} --user {account}`"
        web = self.config.web
        if web.listen is None:
            return (f"550 5.7.1 {account} has not signed in for route {route.name}; an "
                    f"administrator must run {command}")
        # The user can do it themselves on the web page (DESIGN: /signin, self-service).
        host = web.listen.host
        if host in ("0.0.0.0", "::"):
            host = self.config.server.hostname
        url = f"{'http' if web.loopback else 'https'}://{Address(host, web.listen.port)}/signin"
        return (f"550 5.7.1 {account} has not signed in for route {route.name}; sign in at "
                f"{url} (or an administrator runs {command})")
