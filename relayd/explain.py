"""`relayd check --explain`: each route in plain words, the page an admin shows an auditor.

For each route: who may send through it (its sender patterns, and which listener logins may
use them), to whom (its recipient patterns, or anyone), with which account, and what the
upstream is asked to do (send as or on behalf, save to Sent Items, dedupe). It reads only the
config: nothing is contacted, no secret is shown (a secret is named by where it comes from).
"""

from __future__ import annotations

from relayd.config import (
    Config,
    OAuthSettings,
    OutboxSettings,
    RouteConfig,
    SmtpSettings,
    switch_off_warnings,
)
from relayd.delivery.mime import fixed_mailbox
from relayd.router import matches_any


def _patterns(patterns: tuple[str, ...]) -> str:
    words = []
    for p in patterns:
        if p == "*":
            words.append("any address")
        elif p.startswith("*@"):
            words.append(f"any address @{p[2:]}")
        else:
            words.append(p)
    return ", ".join(words)


def _where(route: RouteConfig) -> str:
    if route.upstream == "smtp":
        tls = {"starttls": "STARTTLS", "implicit": "implicit TLS", "none": "no TLS"}
        return f"SMTP to {route.target} ({tls.get(route.smtp.tls, route.smtp.tls)})"
    if route.upstream == "ews":
        return f"Exchange Web Services at {route.target}"
    if route.upstream == "graph":
        return f"Microsoft Graph sendMail at {route.target}"
    return f"no delivery: each message is written as an .eml file under {route.target}"


def _overlap(a: str, b: str) -> bool:
    """Whether one address matches both sender patterns `a` and `b`."""
    if "*" in (a, b) or a == b:
        return True
    if a.startswith("*@") and b.startswith("*@"):
        return False
    if a.startswith("*@"):
        a, b = b, a
    return b.startswith("*@") and matches_any((b,), a)


def _who(config: Config, route: RouteConfig) -> str:
    logins = [u.name for u in config.server.users.values()
              if any(_overlap(up, rp) for up in u.senders for rp in route.senders)]
    who = f"who may send: {_patterns(route.senders)}"
    if config.server.users:
        who += f"; listener logins that may use these addresses: {', '.join(logins) or 'none'}"
    else:
        who += "; from the allowed client addresses without a login"
    return who


def _oauth(route: RouteConfig, oauth: OAuthSettings) -> str:
    google = oauth.provider == "google"
    if route.delegated:
        app = (f"Google client {oauth.client_id}" if google
               else f"app {oauth.client_id}, tenant {oauth.tenant_id}")
        return (f"OAuth delegated: each user's own token from `relayd auth login {route.name} "
                f"--user ADDRESS` ({app}); a user sends only as the account that signed in")
    if google:
        how = ("a Google service account (domain-wide delegation)" if oauth.refresh_token is None
               else "a Google refresh token one user consented to")
        return f"OAuth: {how}, client {oauth.client_id}"
    cred = "a certificate" if oauth.certificate_file else "a client secret"
    return (f"OAuth app-only: app {oauth.client_id} in tenant {oauth.tenant_id} with {cred} "
            "(application permission; scope it to these mailboxes)")


def _account(route: RouteConfig) -> str:
    mailbox = fixed_mailbox(route)
    settings = route.settings
    if isinstance(settings, OutboxSettings):
        return "as which account: none"
    if isinstance(settings, SmtpSettings):
        if settings.auth == "password":
            return f"as which account: {settings.username} with a password (basic SMTP AUTH)"
        if settings.oauth is not None:  # auth = "xoauth2"
            who = mailbox or settings.username or "each sender's own address"
            return f"as which account: {who}, {_oauth(route, settings.oauth)}"
        return "as which account: none (no SMTP AUTH)"
    if settings.oauth is not None:  # graph, or ews with auth = "oauth"
        how = _oauth(route, settings.oauth)
    else:
        ews = route.ews
        how = f"{ews.username} with a password ({ews.auth.upper()})"
    box = f"the mailbox {mailbox}" if mailbox else "each sender's own mailbox"
    return f"as which account: {how}; sending from {box}"


def _asked(route: RouteConfig) -> str:
    mailbox = fixed_mailbox(route)
    settings = route.settings
    if isinstance(settings, OutboxSettings):
        return "the upstream is asked to: nothing (dry run)"
    parts = []
    if not isinstance(settings, SmtpSettings) and settings.from_rewrite:
        parts.append("rewrite From to the route's mailbox and put the sender in Reply-To")
    elif isinstance(settings, SmtpSettings):
        account = settings.username or mailbox
        if account and "*" not in "".join(route.senders) and route.senders == (account,):
            parts.append("send as its own account")
        elif settings.auth == "xoauth2" and mailbox is None:
            # mailbox = "sender": each message goes with a token for its own sender (a
            # Google service account's delegation, or a Microsoft token per sender)
            parts.append("send each message as its own sender, with a token for that sender")
        elif settings.auth == "none":
            parts.append("relay each sender's From unchanged (no login: the upstream must "
                         "accept mail from this host for these senders)")
        else:
            parts.append(f"relay each sender's From unchanged ({_send_as(route, account)})")
    elif mailbox:
        parts.append(f"send from {mailbox} with each sender's From unchanged (needs Send As or "
                     f"Send on Behalf on {mailbox})")
    else:
        parts.append("send from each sender's own mailbox as that sender")
    if not isinstance(settings, SmtpSettings):  # ews, graph
        saved = settings.save_to_sent or route.upstream == "graph"
        parts.append("save a copy in Sent Items" if saved else "keep no copy in Sent Items")
        if settings.dedupe and saved:
            parts.append("after a crash mid-send, look in Sent Items before sending again "
                         "(dedupe)")
        elif settings.dedupe:
            parts.append("dedupe cannot look without a Sent Items copy: at least once")
    if route.rate_limit:
        parts.append(f"at most {route.rate_limit.count} messages per "
                     f"{route.rate_limit.per_s:g} s")
    return "the upstream is asked to: " + "; ".join(parts)


def _provider(route: RouteConfig) -> list[str]:
    """The consumer provider the route talks to and what it refuses (relayd.providers); for a
    delegated Microsoft route, which kinds of account may sign in."""
    from relayd.auth.oauth import is_microsoft_oauth, takes_personal_accounts
    from relayd.providers import explain_line

    out = []
    if route.delegated and is_microsoft_oauth(route) and takes_personal_accounts(route):
        tenant = route.oauth.tenant_id if route.oauth is not None else None
        kinds = ("personal Microsoft accounts only (Outlook.com, Hotmail, Live)"
                 if (tenant or "").lower() == "consumers" else
                 "personal Microsoft accounts (Outlook.com, Hotmail, Live) and work accounts")
        out.append(f"who signs in: {kinds}")
    line = explain_line(route)
    if line:
        out.append(line)
    return out


def _send_as(route: RouteConfig, account: str | None) -> str:
    """Who must allow `account` to send with other From addresses, in the provider's words:
    "Send As" is Exchange's; Azure Communication Services, Gmail and ISP smarthosts have
    their own rules."""
    host = route.smtp.host.lower()
    who = account or "the account"
    if host.endswith((".office365.com", ".outlook.com", ".hve.mx.microsoft")):
        return f"Exchange must let {who} send as them: Send As or Send on Behalf"
    if host.endswith(".azurecomm.net"):
        return ("Azure Communication Services sends only from MailFrom addresses of the email "
                "domain connected to the resource")
    if host.endswith((".gmail.com", ".googlemail.com")):
        return (f"Gmail rewrites From to {who} unless the address is one of its verified "
                "\"Send mail as\" addresses")
    return f"the provider must accept these From addresses from {who}"


def explain(config: Config) -> list[str]:
    lines = []
    for route in config.routes.values():
        lines.append(f"route {route.name}: {_where(route)}")
        lines.append(f"  {_who(config, route)}")
        to = _patterns(route.recipients) if route.recipients else "anyone"
        lines.append(f"  to whom: {to}")
        lines.append(f"  {_account(route)}")
        lines.append(f"  {_asked(route)}")
        lines.extend(f"  {line}" for line in _provider(route))
        lines.extend(f"  warning: {w.split(': ', 1)[1]}" for w in switch_off_warnings(route))
    if config.server.null_sender_route:
        lines.append(f"null-sender mail (bounces from a front MTA) goes through route "
                     f"{config.server.null_sender_route}")
    return lines
