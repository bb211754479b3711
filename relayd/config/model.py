"""The config's types: frozen dataclasses, one per section, and their defaults.

A route is a common part and one part per upstream kind: `RouteConfig` holds what every route
has (name, senders, recipients, rates, timeout, ca_file) and in `settings` exactly one of
`SmtpSettings`, `EwsSettings`, `GraphSettings`, `OutboxSettings`; `upstream` is the kind of
that part, never stored beside it. The routes that sign in with OAuth (smtp auth = "xoauth2",
ews auth = "oauth", every graph route) hold an `OAuthSettings` in their part; a graph part
cannot be built without one, and the smtp and ews parts refuse one that their `auth` does not
take. Each part is reached through the accessor of its kind (`route.graph.endpoint`), which
raises TypeError on a route of another kind; code that serves every kind asks the common part
(`target`, `oauth`, `delegated`, `uses_password`, `dedupe`) or branches with isinstance on
`settings`, which mypy narrows. All of them stay frozen dataclasses with value equality: a
reload and the token registry compare routes. Why this shape, and the flat one it replaced:
relayd.config.routes.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar, TypeVar

from relayd import platform

DEFAULT_CONFIG_PATH = platform.CONFIG_PATH


CONFIG_ENV = "RELAYD_CONFIG"


CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"


DEFAULT_MAX_MESSAGE_SIZE = 35 * 1000 * 1000


DEFAULT_MAX_CONNECTIONS = 2


# Graph routes: a session is a coroutine on one shared HTTP pool, and Graph takes 4 concurrent
# requests per mailbox (relayd.delivery.graph limits each mailbox to that), so 32 lets 8
# senders' mailboxes send at Graph's rate side by side (bench/README.md, Graph section); 2
# would hold the whole route to half of one mailbox's rate.
DEFAULT_MAX_CONNECTIONS_GRAPH = 32


DEFAULT_TIMEOUT_S = 60.0


MAX_WORKERS = 64


CPU_SCHEDULING = ("batch", "inherit")  # server.cpu_scheduling (relayd.service.use_cpu_scheduling)


DEFAULT_MAX_SESSIONS = 100  # SMTP sessions at once, per listener process (Postfix: 100)


DEFAULT_MAX_SESSIONS_PER_CLIENT = 20  # of which from one client address


DEFAULT_SESSION_TIMEOUT_S = 300.0  # an idle or slow SMTP session is closed after this


UPSTREAMS = ("smtp", "ews", "graph", "outbox")


def _implemented_upstreams() -> frozenset[str]:
    """Upstreams whose delivery module exists. The others are valid names that `relayd check`
    reports as "not supported yet" instead of failing later."""
    here = Path(__file__).parent.parent / "delivery"
    return frozenset(u for u in UPSTREAMS if (here / f"{u}.py").is_file())


IMPLEMENTED_UPSTREAMS = _implemented_upstreams()


class Secret:
    """A credential that never prints itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Address:
    """A host and port to listen on or connect to."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RateLimit:
    count: int
    per_s: float


@dataclass(frozen=True)
class ServerUser:
    name: str
    password_hash: Secret
    senders: tuple[str, ...]


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[Address, ...] = (Address("127.0.0.1", 2525),)
    hostname: str = "localhost"
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    allowed_clients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    tls_cert: Path | None = None
    tls_key: Path | None = None
    listen_tls: tuple[Address, ...] = ()
    tls_legacy: bool = False
    users: Mapping[str, ServerUser] = field(default_factory=lambda: MappingProxyType({}))
    workers: int = 1  # processes: 1 does everything; N > 1, the main one delivers, N - 1 listen
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_sessions_per_client: int = DEFAULT_MAX_SESSIONS_PER_CLIENT
    session_timeout_s: float = DEFAULT_SESSION_TIMEOUT_S
    null_sender_route: str | None = None  # the route for MAIL FROM:<>; None: refused
    cpu_scheduling: str = "batch"  # "batch": SCHED_BATCH when started with the normal policy


@dataclass(frozen=True)
class QueueConfig:
    path: Path = platform.STATE_DIR / "queue"
    max_age_s: float = 5 * 86400
    retry_min_s: float = 60
    retry_max_s: float = 3600


@dataclass(frozen=True)
class JournalConfig:
    path: Path = platform.STATE_DIR / "journal"  # default: beside queue.path
    keep_s: float = 90 * 86400
    subjects: bool = True


@dataclass(frozen=True)
class NotifyConfig:
    """[notify]: mail to the admin when something needs a person (relayd.notify)."""

    to: tuple[str, ...]
    sender: str  # matches a route; the notices go out through it
    deferred_after_s: float = 3600.0  # a message deferred longer than this is reported
    expiry_warning_s: float = 30 * 86400.0  # a client secret or certificate expiring within
    repeat_s: float = 86400.0  # at most one notice per condition per this


@dataclass(frozen=True)
class MetricsConfig:
    listen: Address | None = None


@dataclass(frozen=True)
class WebConfig:
    """The status page and self-service sign-in; off when `listen` is None."""

    listen: Address | None = None
    admins: tuple[str, ...] = ()  # [server.users] names that may see the status page
    loopback: bool = True  # listen is a loopback address: plain HTTP, no login
    viewers: tuple[str, ...] = ()  # [server.users] names that may see every page, not act


@dataclass(frozen=True)
class AuthConfig:
    path: Path = platform.STATE_DIR / "tokens"
    key_file: Path | None = None


@dataclass(frozen=True)
class OAuthSettings:
    """How a route gets its OAuth tokens: smtp with auth = "xoauth2", ews with auth = "oauth",
    and every graph route (relayd.auth)."""

    client_id: str
    provider: str = "microsoft"  # or "google" (smtp only)
    tenant_id: str | None = None
    authority: str | None = None
    client_secret: Secret | None = None  # a Google service account: its JSON key
    certificate_file: Path | None = None
    thumbprint: str | None = None
    flow: str = "app"  # "app": the app's own token; "device": each user signs in
    client_secret_expires: datetime.date | None = None  # so relayd can warn before it lapses
    refresh_token: Secret | None = None  # Google: one user's consent


@dataclass(frozen=True)
class SmtpSettings:
    """upstream = "smtp" (relayd.delivery.smtp)."""

    UPSTREAM: ClassVar[str] = "smtp"
    host: str
    port: int
    tls: str = "starttls"  # "starttls", "implicit" or "none"
    auth: str = "none"  # "password", "xoauth2" or "none"
    username: str | None = None
    password: Secret | None = None
    mailbox: str | None = None  # auth = "xoauth2": a fixed account, or "sender"
    oauth: OAuthSettings | None = None  # set exactly when auth = "xoauth2"

    def __post_init__(self) -> None:
        _check_oauth(self.auth == "xoauth2", self.oauth, 'auth = "xoauth2"')


@dataclass(frozen=True)
class EwsSettings:
    """upstream = "ews" (relayd.delivery.ews): one of server and service_endpoint is set."""

    UPSTREAM: ClassVar[str] = "ews"
    server: str | None = None
    service_endpoint: str | None = None
    auth: str = "basic"  # "basic", "ntlm" or "oauth"
    username: str | None = None
    password: Secret | None = None
    mailbox: str = "sender"  # a fixed mailbox address, or "sender"
    save_to_sent: bool = True
    from_rewrite: bool = False
    dedupe: bool = True  # after a crash, look in Sent Items before sending again
    oauth: OAuthSettings | None = None  # set exactly when auth = "oauth"

    def __post_init__(self) -> None:
        _check_oauth(self.auth == "oauth", self.oauth, 'auth = "oauth"')


@dataclass(frozen=True)
class GraphSettings:
    """upstream = "graph" (relayd.delivery.graph): always OAuth."""

    UPSTREAM: ClassVar[str] = "graph"
    oauth: OAuthSettings
    endpoint: str = "https://graph.microsoft.com"
    mailbox: str = "sender"
    save_to_sent: bool = True  # Graph saves a copy whatever this says (a config warning)
    from_rewrite: bool = False
    dedupe: bool = True


@dataclass(frozen=True)
class OutboxSettings:
    """upstream = "outbox" (relayd.delivery.outbox): no delivery, .eml files in a folder."""

    UPSTREAM: ClassVar[str] = "outbox"
    path: Path


UpstreamSettings = SmtpSettings | EwsSettings | GraphSettings | OutboxSettings


_Part = TypeVar("_Part", SmtpSettings, EwsSettings, GraphSettings, OutboxSettings)


def _check_oauth(takes: bool, oauth: OAuthSettings | None, setting: str) -> None:
    if takes != (oauth is not None):
        raise ValueError(f"OAuth settings go with {setting} and only with it")


@dataclass(frozen=True)
class RouteConfig:
    """One route: what every route has, and in `settings` its upstream kind's own part. A
    delivery agent reads its part through the accessor of its kind (`route.smtp.host`), which
    raises TypeError on a route of another kind; code that serves every kind branches on
    `upstream` (or isinstance on `settings`, which mypy narrows)."""

    name: str
    senders: tuple[str, ...]
    settings: UpstreamSettings
    recipients: tuple[str, ...] = ()  # RCPT outside these is refused; () allows any
    rate_limit: RateLimit | None = None
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # per sending mailbox (relayd.qmgr.pacing): None takes the provider's default, a count of
    # 0 (a rate of 0) none
    mailbox_rate_limit: RateLimit | None = None
    mailbox_daily_recipients: int | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    ca_file: Path | None = None  # not for outbox

    @property
    def upstream(self) -> str:
        """"smtp", "ews", "graph" or "outbox": the kind of `settings`."""
        return self.settings.UPSTREAM

    @property
    def smtp(self) -> SmtpSettings:
        return self._part(SmtpSettings)

    @property
    def ews(self) -> EwsSettings:
        return self._part(EwsSettings)

    @property
    def graph(self) -> GraphSettings:
        return self._part(GraphSettings)

    @property
    def outbox(self) -> OutboxSettings:
        return self._part(OutboxSettings)

    def _part(self, kind: type[_Part]) -> _Part:
        if isinstance(self.settings, kind):
            return self.settings
        raise TypeError(f'route {self.name} has upstream = "{self.upstream}", not '
                        f'"{kind.UPSTREAM}"')

    @property
    def oauth(self) -> OAuthSettings | None:
        """The route's OAuth settings; None when it signs in without OAuth (or not at all)."""
        return None if isinstance(self.settings, OutboxSettings) else self.settings.oauth

    @property
    def delegated(self) -> bool:
        """Each user signs in for the route (`relayd auth login`, /signin): OAuth flow =
        "device". A Google route's refresh_token_file is one user's consent given once, which
        takes the place of sign-ins (it is read for Google only: relayd.config.routes)."""
        oauth = self.oauth
        return oauth is not None and oauth.flow == "device" and oauth.refresh_token is None

    @property
    def uses_password(self) -> bool:
        """The route logs in with a password (smtp auth = "password", ews "basic" or "ntlm"):
        a refused login means a wrong password."""
        settings = self.settings
        if isinstance(settings, SmtpSettings):
            return settings.auth == "password"
        return isinstance(settings, EwsSettings) and settings.auth in ("basic", "ntlm")

    @property
    def dedupe(self) -> bool:
        """After a crash mid-send, the agent looks in Sent Items before sending again (ews and
        graph routes with dedupe on; other kinds have nothing to look in)."""
        settings = self.settings
        return isinstance(settings, EwsSettings | GraphSettings) and settings.dedupe

    @property
    def target(self) -> str:
        """What the route talks to: host:port, the EWS or Graph endpoint, the outbox folder."""
        settings = self.settings
        if isinstance(settings, SmtpSettings):
            return f"{settings.host}:{settings.port}"
        if isinstance(settings, EwsSettings):
            return settings.service_endpoint or settings.server or ""
        if isinstance(settings, GraphSettings):
            return settings.endpoint
        return str(settings.path)

    @property
    def upstream_name(self) -> str:
        """`smtp:host:port`, `graph:URL`, ... (the journal, the status page)."""
        return f"{self.upstream}:{self.target}"


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    queue: QueueConfig
    metrics: MetricsConfig
    auth: AuthConfig
    routes: Mapping[str, RouteConfig]
    source: str = ""
    warnings: tuple[str, ...] = ()  # valid, but not what the admin may expect
    journal: JournalConfig = JournalConfig()
    notify: NotifyConfig | None = None  # None: no [notify] section, nobody is mailed
    web: WebConfig = WebConfig()
    secret_problems: tuple[str, ...] = ()  # load_config(secrets_optional=True) only


NO_RATE = RateLimit(0, 1.0)  # mailbox_rate_limit = 0: no limit, not the provider's default
