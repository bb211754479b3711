"""[routes.NAME]: one route per table, each kind of upstream with its own keys.

A route's table takes the keys every route has (`_COMMON_KEYS`) plus its upstream kind's
(`_UPSTREAM_KEYS`); any other key is an error naming the key and the kind (`routes.x.server:
unknown key for upstream = "smtp"`), so `relayd check` cannot pass a setting that the route's
delivery agent would never read. A key of the route's own kind that its other settings leave
unread (`client_id` with `auth = "password"`) is an error too.

Each kind's keys are parsed into that kind's own type (relayd.config.model: `SmtpSettings`,
`EwsSettings`, `GraphSettings`, `OutboxSettings`, and `OAuthSettings` for the routes that sign
in with OAuth), held by the route's common part, `RouteConfig`. So what the check above refuses
in the file, the types refuse in the code: a delivery agent, the auth code and the web pages
read their kind's part (`route.smtp.host`, the OAuth part's `client_id`), and an EWS route has
no `host` to read or set.

Rejected: one flat `RouteConfig` with every kind's fields, those of other kinds left None (the
shape before issue 24, the check above its only guard). It let any code read `route.host` on a
Graph route and get None, so every reader had to know which fields its kind fills, and mypy
could not tell a missing setting from one of the wrong kind; the split costs one accessor per
read (`route.smtp.host`) and proves each read belongs to the route's kind.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from relayd.config.model import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_GRAPH,
    DEFAULT_TIMEOUT_S,
    IMPLEMENTED_UPSTREAMS,
    UPSTREAMS,
    EwsSettings,
    GraphSettings,
    OAuthSettings,
    OutboxSettings,
    RouteConfig,
    SmtpSettings,
    UpstreamSettings,
)
from relayd.config.values import (
    HOST_RE,
    SecretProblem,
    Section,
    parse_date,
    parse_duration,
    parse_rate,
    parse_rate_or_none,
    read_secret,
)
from relayd.patterns import ascii_lower, validate_pattern

# Microsoft's switch-offs (FIELD-NOTES; Microsoft: "Deprecation of Basic authentication in
# Exchange Online", "EWS retirement in Exchange Online"). Named where an admin looks: `relayd
# check` (and --explain), the start-up log and the status page all show Config.warnings.
EXCHANGE_ONLINE_SMTP_HOSTS = ("smtp.office365.com", "outlook.office365.com")


EXCHANGE_ONLINE_EWS_HOSTS = ("outlook.office365.com", "outlook.office.com")


BASIC_SMTP_AUTH_OFF = "the end of December 2026"


EWS_BLOCKED, EWS_GONE = "2026-10-01", "2027-04-01"


GRAPH_EXAMPLE = "conf/examples/m365-graph-app.toml"


def switch_off_warnings(r: RouteConfig) -> list[str]:
    """The provider switch-offs that will stop (or have stopped) route `r`."""
    settings = r.settings
    if isinstance(settings, SmtpSettings) and settings.auth == "password" and \
            ascii_lower(settings.host) in EXCHANGE_ONLINE_SMTP_HOSTS:
        return [f"routes.{r.name}: basic SMTP AUTH (a password) at Exchange Online "
                f"({settings.host}): Microsoft turns it off by default in existing tenants at "
                f"{BASIC_SMTP_AUTH_OFF}; the refusal (550 5.7.30, 535 5.7.139) defers this "
                f'route\'s mail until it is moved to upstream = "graph" ({GRAPH_EXAMPLE}) or '
                'auth = "xoauth2" with provider = "microsoft" (docs/graph.md)']
    if isinstance(settings, EwsSettings):
        host = ascii_lower(settings.server or settings.service_endpoint or "")
        host = host.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
        if host in EXCHANGE_ONLINE_EWS_HOSTS:
            return [f"routes.{r.name}: EWS at Exchange Online ({host}) is blocked since "
                    f"{EWS_BLOCKED} unless the tenant sets EWSEnabled and allows this app "
                    f"(EWSAllowedAppIDs), and gone for good on {EWS_GONE}; move this route "
                    f'to upstream = "graph" ({GRAPH_EXAMPLE}, docs/graph.md)']
    return []


def route_warnings(routes: Mapping[str, RouteConfig]) -> tuple[str, ...]:
    out = []
    for r in routes.values():
        out.extend(switch_off_warnings(r))
        if isinstance(r.settings, GraphSettings) and not r.settings.save_to_sent:
            out.append(f"routes.{r.name}.save_to_sent: Graph sendMail with a MIME body always "
                       "saves a copy in Sent Items; false has no effect")
        if isinstance(r.settings, EwsSettings) and r.settings.dedupe \
                and not r.settings.save_to_sent:
            out.append(f"routes.{r.name}.dedupe: with save_to_sent = false Exchange keeps no "
                       "copy to look for after a crash, so this route delivers at least once")
    return tuple(out)


# Keys each upstream takes, beyond the ones every route has.
_COMMON_KEYS = ("senders", "recipients", "upstream", "rate_limit", "max_connections",
                "timeout", "mailbox_rate_limit", "mailbox_daily_recipients")


_OAUTH_KEYS = ("tenant_id", "client_id", "client_secret_file", "client_secret_env",
               "certificate_file", "thumbprint", "flow", "authority", "client_secret_expires")


_UPSTREAM_KEYS: dict[str, tuple[str, ...]] = {
    "smtp": ("host", "port", "tls", "auth", "username", "password_file", "password_env",
             "provider", "refresh_token_file", "refresh_token_env", "mailbox", "ca_file",
             *_OAUTH_KEYS),
    "ews": ("auth", "server", "service_endpoint", "username", "password_file", "password_env",
            "mailbox", "save_to_sent", "from_rewrite", "dedupe", "ca_file", *_OAUTH_KEYS),
    "graph": ("endpoint", "mailbox", "save_to_sent", "from_rewrite", "dedupe", "ca_file",
              *_OAUTH_KEYS),
    "outbox": ("path",),
}


# What admins write first (a Windows admin's first try): the secret itself, in the file.
_INLINE_SECRETS = ("password", "client_secret", "refresh_token")


def _parse_oauth(s: Section, *, provider: str = "microsoft") -> OAuthSettings | None:
    """The OAuth keys shared by ews (auth = oauth), graph and smtp (auth = xoauth2); None when
    client_id is missing (a problem reported)."""
    flow = s.text("flow", "app", choices=("app", "device"))
    client_id = s.text("client_id")
    tenant_id = s.text("tenant_id")
    authority = s.text("authority")
    if authority is not None and not authority.startswith("https://"):
        s.problem("authority", "must be an https:// URL")
    if client_id is None:
        s.problem("client_id", "required for OAuth")
    if provider == "microsoft" and tenant_id is None:
        s.problem("tenant_id", "required for Microsoft OAuth")
    cert = s.text("certificate_file")
    thumb = s.text("thumbprint")
    has_secret = s.has("client_secret_file") or s.has("client_secret_env")
    if cert is not None and has_secret:
        s.problem("certificate_file", "give client_secret_file/_env or certificate_file, not both")
    if (cert is None) != (thumb is None):
        s.problem("thumbprint", "certificate_file and thumbprint go together")
    needs_secret = flow == "app" and cert is None and provider == "microsoft"
    client_secret = read_secret(s, "client_secret", required=needs_secret,
                                what="the app's client secret")
    expires = s.convert("client_secret_expires", parse_date, (str, datetime.date))
    if client_id is None:
        return None
    return OAuthSettings(client_id=client_id, provider=provider, tenant_id=tenant_id,
                         authority=authority, client_secret=client_secret,
                         certificate_file=Path(cert) if cert else None, thumbprint=thumb,
                         flow=flow, client_secret_expires=expires)


def parse_route(name: str, data: Mapping[str, Any], problems: list[str]) -> RouteConfig | None:
    s = Section(data, f"routes.{name}", problems)
    start = len(problems)
    senders, recipients = _parse_patterns(s)
    upstream = s.text("upstream")
    if upstream is None:
        s.problem("upstream", f"required: one of {', '.join(UPSTREAMS)}")
        return None
    if upstream not in UPSTREAMS:
        s.problem("upstream", f"must be one of {', '.join(UPSTREAMS)}")
        return None
    if upstream not in IMPLEMENTED_UPSTREAMS:
        s.problem("upstream", f'"{upstream}" is not supported yet by this version of relayd')
        return None
    v: dict[str, Any] = {}
    v["rate_limit"] = s.convert("rate_limit", parse_rate)
    v["mailbox_rate_limit"] = s.convert("mailbox_rate_limit", parse_rate_or_none, (str, int))
    v["mailbox_daily_recipients"] = s.get("mailbox_daily_recipients", int, None)
    if v["mailbox_daily_recipients"] is not None and v["mailbox_daily_recipients"] < 0:
        s.problem("mailbox_daily_recipients", "must be 0 (no budget) or more")
    v["max_connections"] = s.get("max_connections", int, DEFAULT_MAX_CONNECTIONS_GRAPH
                                 if upstream == "graph" else DEFAULT_MAX_CONNECTIONS)
    if not 1 <= v["max_connections"] <= 100:
        s.problem("max_connections", "must be 1-100")
    v["timeout_s"] = s.convert("timeout", parse_duration, default=DEFAULT_TIMEOUT_S)
    ca = s.text("ca_file") if upstream != "outbox" else None  # outbox: no TLS, no ca_file
    if ca is not None and not os.access(ca, os.R_OK):
        s.problem("ca_file", f"cannot read {ca}")
    v["ca_file"] = Path(ca) if ca else None

    k: dict[str, Any] = {}  # the upstream kind's own settings
    _PARSERS[upstream](s, k)
    _check_unused_keys(s, upstream)
    if any(not isinstance(p, SecretProblem) for p in problems[start:]):
        return None
    return RouteConfig(name=name, senders=tuple(ascii_lower(p) for p in senders),
                       recipients=tuple(ascii_lower(p) for p in recipients),
                       settings=_SETTINGS[upstream](**k), **v)


def _parse_patterns(s: Section) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """senders (required) and recipients (optional): addresses, *@domain or *."""
    senders = s.string_list("senders")
    if not senders:
        s.problem("senders", "required: a list of sender addresses or patterns")
    for pattern in senders:
        why = validate_pattern(ascii_lower(pattern))
        if why:
            s.problem("senders", why)
    recipients = s.string_list("recipients")
    if s.has("recipients") and not recipients:
        s.problem("recipients", "must list at least one address or pattern (omit it to allow "
                  "any recipient)")
    for pattern in recipients:
        why = validate_pattern(ascii_lower(pattern))
        if why:
            s.problem("recipients", why)
    return senders, recipients


def _check_unused_keys(s: Section, upstream: str) -> None:
    """Every key the parse above did not read is an error naming it: a key of another upstream
    kind, a secret written inline, a key its route's other settings leave unread, a typo."""
    allowed = _COMMON_KEYS + _UPSTREAM_KEYS[upstream]
    for key in s.data:
        if key in s.used:
            continue
        if key in allowed:
            s.problem(key, "does not apply with this route's other settings (auth, flow, tls)")
        elif key in _INLINE_SECRETS:
            s.problem(key, f"unknown key: relayd does not read secrets from its config file; "
                      f"put it in a file only relayd can read and give {key}_file, or name an "
                      f"environment variable with {key}_env")
        elif any(key in keys for keys in _UPSTREAM_KEYS.values()):
            s.problem(key, f'unknown key for upstream = "{upstream}"')
        else:
            s.problem(key, "unknown key")


def _parse_outbox_route(s: Section, k: dict[str, Any]) -> None:
    path = s.text("path")
    if path is None:
        s.problem("path", "required: the folder .eml files are written to")
    k["path"] = Path(path) if path else None


def _parse_smtp_route(s: Section, k: dict[str, Any]) -> None:
    k["host"] = s.text("host")
    if k["host"] is None:
        s.problem("host", "required: the upstream SMTP server")
    elif not HOST_RE.match(k["host"]):
        s.problem("host", "must be a host name or address")
    k["tls"] = s.text("tls", "starttls", choices=("starttls", "implicit", "none"))
    port = s.get("port", int, 465 if k["tls"] == "implicit" else 587)
    if not 1 <= port <= 65535:
        s.problem("port", "must be 1-65535")
    k["port"] = port
    k["auth"] = s.text("auth", None, choices=("password", "xoauth2", "none"))
    if k["auth"] is None:
        has_pw = s.has("password_file") or s.has("password_env")
        k["auth"] = "password" if has_pw else "none"
    k["username"] = s.text("username")
    if k["auth"] == "none" and k["username"] is not None:
        # Without this relayd would send without SMTP AUTH, and the upstream would refuse the
        # mail (or relay it as anyone's) long after `relayd check` said ok.
        s.problem("username", "given without a password: add password_file (or password_env) "
                  'for SMTP AUTH, or remove username to send without AUTH')
    if k["auth"] == "password":
        if k["username"] is None:
            s.problem("username", 'required with auth = "password"')
        k["password"] = read_secret(s, "password", required=True, what="the account's password")
    elif k["auth"] == "xoauth2":
        provider = s.text("provider", None, choices=("microsoft", "google"))
        if provider is None:
            s.problem("provider", 'required with auth = "xoauth2": "microsoft" or "google"')
        k["mailbox"] = s.text("mailbox", "sender")
        oauth = _parse_oauth(s, provider=provider or "microsoft")
        if provider == "google":  # one user's consent; Microsoft's tokens come from MSAL
            refresh_token = read_secret(s, "refresh_token", required=False, what="")
            if oauth is not None:
                oauth = dataclasses.replace(oauth, refresh_token=refresh_token)
        k["oauth"] = oauth
        if provider == "google" and not s.has("client_secret_file") \
                and not s.has("client_secret_env"):
            # Google: a user's refresh token with the app's client secret, or a service
            # account whose JSON key is the client secret. Either way a client secret.
            s.problem("client_secret_file", "required for Google: the OAuth client secret (with "
                      "refresh_token_file) or the service account's JSON key")
    if k["auth"] != "none" and k["tls"] == "none" and k["host"] not in ("127.0.0.1", "::1",
                                                                     "localhost"):
        s.problem("tls", 'credentials would cross the network in clear; use "starttls" or '
                  '"implicit"')


def _parse_mailbox_keys(s: Section, k: dict[str, Any]) -> None:
    k["mailbox"] = s.text("mailbox", "sender")
    if k["mailbox"] != "sender" and validate_pattern(k["mailbox"]) is not None:
        s.problem("mailbox", '"sender" or an email address')
    k["save_to_sent"] = s.get("save_to_sent", bool, True)
    k["from_rewrite"] = s.get("from_rewrite", bool, False)
    if k["from_rewrite"] and k["mailbox"] == "sender":
        s.problem("from_rewrite", 'needs a fixed mailbox address (mailbox = "sender" already '
                  "sends as the sender)")


def _parse_ews_route(s: Section, k: dict[str, Any]) -> None:
    default_auth = "oauth" if s.has("client_id") else "basic"
    k["auth"] = s.text("auth", default_auth, choices=("basic", "ntlm", "oauth"))
    k["server"] = s.text("server")
    k["service_endpoint"] = s.text("service_endpoint")
    if (k["server"] is None) == (k["service_endpoint"] is None):
        s.problem("server", "give server or service_endpoint (exactly one)")
    if k["server"] is not None and not HOST_RE.match(k["server"]):
        s.problem("server", "must be a host name")
    if k["service_endpoint"] is not None and not k["service_endpoint"].startswith(
            ("https://", "http://")):
        s.problem("service_endpoint", "must be an https:// URL")
    if k["auth"] == "oauth" and (k["service_endpoint"] or "https://").startswith("http://"):
        s.problem("service_endpoint", "OAuth needs an https:// endpoint")
    _parse_mailbox_keys(s, k)
    if k["auth"] in ("basic", "ntlm"):
        k["username"] = s.text("username")
        if k["username"] is None:
            s.problem("username", f'required with auth = "{k["auth"]}"')
        k["password"] = read_secret(s, "password", required=True, what="the account's password")
    else:
        k["oauth"] = _parse_oauth(s)
    k["dedupe"] = bool(s.get("dedupe", bool, True))


def _parse_graph_route(s: Section, k: dict[str, Any]) -> None:
    k["endpoint"] = s.text("endpoint", "https://graph.microsoft.com")
    if not k["endpoint"].startswith("https://"):
        s.problem("endpoint", "must be an https:// URL")
    _parse_mailbox_keys(s, k)
    k["oauth"] = _parse_oauth(s)
    k["dedupe"] = bool(s.get("dedupe", bool, True))


_PARSERS: dict[str, Callable[[Section, dict[str, Any]], None]] = {
    "smtp": _parse_smtp_route, "ews": _parse_ews_route, "graph": _parse_graph_route,
    "outbox": _parse_outbox_route}


_SETTINGS: dict[str, type[UpstreamSettings]] = {
    kind.UPSTREAM: kind for kind in (SmtpSettings, EwsSettings, GraphSettings, OutboxSettings)}


def check_patterns(claimed: Mapping[str, Sequence[str]], problems: list[str]) -> None:
    """Two routes claiming one sender pattern, whether or not either has other problems
    (every problem at once, always)."""
    owner: dict[str, str] = {}
    for name, patterns in claimed.items():
        for pattern in patterns:
            if pattern in owner and owner[pattern] != name:
                problems.append(f"routes.{name}.senders: {pattern!r} is already claimed by "
                                f"routes.{owner[pattern]}")
            else:
                owner[pattern] = name
