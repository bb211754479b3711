"""TOML -> immutable, validated config objects; every problem reported at once, naming its key."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from relayd import platform
from relayd.errors import ConfigError
from relayd.patterns import allows, best_pattern
from relayd.patterns import ascii_lower as ascii_lower
from relayd.patterns import validate_pattern as _validate_pattern
from relayd.platform import fs, proc

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
    here = Path(__file__).parent / "delivery"
    return frozenset(u for u in UPSTREAMS if (here / f"{u}.py").is_file())


IMPLEMENTED_UPSTREAMS = _implemented_upstreams()

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3}
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$")
_RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
               "h": 3600, "hour": 3600, "d": 86400, "day": 86400}
_HOST_RE = re.compile(r"^[A-Za-z0-9._:-]+$")


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
class RouteConfig:
    """One upstream route. Keys that do not apply to its upstream stay None: the fields below
    are grouped by the upstream kind that takes them, and `_UPSTREAM_KEYS` (checked at load)
    is what keeps a route's config file table to its own kind's keys."""

    name: str
    senders: tuple[str, ...]
    upstream: str
    recipients: tuple[str, ...] = ()  # RCPT outside these is refused; () allows any
    rate_limit: RateLimit | None = None
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # per sending mailbox (relayd.qmgr.pacing): None takes the provider's default, a count of
    # 0 (a rate of 0) none
    mailbox_rate_limit: RateLimit | None = None
    mailbox_daily_recipients: int | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    ca_file: Path | None = None
    # smtp
    host: str | None = None
    port: int | None = None
    tls: str | None = None
    auth: str | None = None
    username: str | None = None
    password: Secret | None = None
    provider: str | None = None
    # ews / graph / xoauth2
    server: str | None = None
    service_endpoint: str | None = None
    endpoint: str | None = None
    authority: str | None = None
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: Secret | None = None
    certificate_file: Path | None = None
    thumbprint: str | None = None
    refresh_token: Secret | None = None
    flow: str | None = None
    client_secret_expires: datetime.date | None = None  # so relayd can warn before it lapses
    mailbox: str | None = None
    save_to_sent: bool = True
    from_rewrite: bool = False
    dedupe: bool = False  # ews/graph (default true there): after a crash, look in Sent Items
    # outbox
    path: Path | None = None

    @property
    def target(self) -> str:
        """What the route talks to: host:port, the EWS or Graph endpoint, the outbox folder."""
        if self.upstream == "smtp":
            return f"{self.host}:{self.port}"
        if self.upstream == "ews":
            return self.service_endpoint or self.server or ""
        if self.upstream == "graph":
            return self.endpoint or ""
        return str(self.path or "")

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
    if r.upstream == "smtp" and r.auth == "password" and \
            ascii_lower(r.host or "") in EXCHANGE_ONLINE_SMTP_HOSTS:
        return [f"routes.{r.name}: basic SMTP AUTH (a password) at Exchange Online "
                f"({r.host}): Microsoft turns it off by default in existing tenants at "
                f"{BASIC_SMTP_AUTH_OFF}; the refusal (550 5.7.30, 535 5.7.139) defers this "
                f'route\'s mail until it is moved to upstream = "graph" ({GRAPH_EXAMPLE}) or '
                'auth = "xoauth2" with provider = "microsoft" (docs/graph.md)']
    if r.upstream == "ews":
        host = ascii_lower(r.server or r.service_endpoint or "")
        host = host.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
        if host in EXCHANGE_ONLINE_EWS_HOSTS:
            return [f"routes.{r.name}: EWS at Exchange Online ({host}) is blocked since "
                    f"{EWS_BLOCKED} unless the tenant sets EWSEnabled and allows this app "
                    f"(EWSAllowedAppIDs), and gone for good on {EWS_GONE}; move this route "
                    f'to upstream = "graph" ({GRAPH_EXAMPLE}, docs/graph.md)']
    return []


def _warnings(routes: Mapping[str, RouteConfig]) -> tuple[str, ...]:
    out = []
    for r in routes.values():
        out.extend(switch_off_warnings(r))
        if r.upstream == "graph" and not r.save_to_sent:
            out.append(f"routes.{r.name}.save_to_sent: Graph sendMail with a MIME body always "
                       "saves a copy in Sent Items; false has no effect")
        if r.upstream == "ews" and r.dedupe and not r.save_to_sent:
            out.append(f"routes.{r.name}.dedupe: with save_to_sent = false Exchange keeps no "
                       "copy to look for after a crash, so this route delivers at least once")
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Parsing helpers. Each appends to `problems` and returns None instead of raising, so that one
# load reports everything wrong with the file.


def parse_duration(text: str) -> float:
    """'90s', '5m', '1.5h', '5d' -> seconds."""
    m = _DURATION_RE.match(text)
    if not m:
        raise ValueError("must be a duration such as 30s, 5m, 1h or 5d")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(text: str | int) -> int:
    """'35MB' -> 35000000; a bare integer is bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError("must be a positive size")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError("must be a size such as 512KB, 35MB or 1GB")
    value = int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "B").upper()]
    if value <= 0:
        raise ValueError("must be a positive size")
    return value


def parse_address(text: str, *, allow_zero: bool = False) -> Address:
    """'127.0.0.1:2525' or '[::1]:2525' -> Address."""
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", text) or re.match(r"^([^:\[\]\s]+):(\d+)$", text)
    if not m:
        raise ValueError('must be "host:port" (IPv6: "[::1]:port")')
    port = int(m.group(2))
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError("port must be 1-65535")
    return Address(m.group(1), port)


class _Section:
    """Reads one TOML table, tracking which keys were used so the rest can be called unknown."""

    def __init__(self, data: Mapping[str, Any], prefix: str, problems: list[str]) -> None:
        self.data = data
        self.prefix = prefix
        self.problems = problems
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def problem(self, name: str, message: str) -> None:
        self.problems.append(f"{self.key(name)}: {message}")

    def has(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            value_ok = False
        else:
            value_ok = isinstance(value, kinds)
        if not value_ok:
            names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            self.problem(name, f"must be {names}")
            return default
        return value

    def text(self, name: str, default: str | None = None, *, choices: tuple[str, ...] = ()) -> Any:
        value = self.get(name, str, default)
        if value is None or name not in self.data:
            return value
        if "\r" in value or "\n" in value or "\0" in value:
            self.problem(name, "must not contain line breaks")
            return default
        if choices and value not in choices:
            self.problem(name, f"must be one of {', '.join(choices)}")
            return default
        return value

    def convert(self, name: str, parser: Callable[[Any], Any], kind: type | tuple[type, ...] = str,
                default: Any = None) -> Any:
        raw = self.get(name, kind, None)
        if raw is None:
            return default
        try:
            return parser(raw)
        except ValueError as e:
            self.problem(name, str(e))
            return default

    def string_list(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(name, list, None)
        if value is None:
            return default
        if not all(isinstance(v, str) for v in value):
            self.problem(name, "must be a list of strings")
            return default
        return tuple(value)

    def unknown(self, skip: tuple[str, ...] = ()) -> None:
        for name in self.data:
            if name not in self.used and name not in skip:
                self.problem(name, "unknown key")


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list",
               dict: "a table", float: "a number"}


class SecretProblem(str):
    """A problem with a secret's value (a file that cannot be read, a variable not set), as
    opposed to the config's shape. `relayd check --explain` explains a config whose only
    problems are these (the examples outside the systemd unit), then lists them."""


# What a route holds for a secret that could not be read: the route is complete (for --explain)
# and such a config is never served (load_config raises unless secrets_optional).
UNREADABLE = Secret("")


def _read_secret_file(path_text: str, key: str, problems: list[str]) -> Secret | None:
    """Read a secret from a file that only its owner can read.

    A relative path is looked up in systemd's $CREDENTIALS_DIRECTORY (LoadCredential=).
    """

    def bad(text: str) -> Secret:
        problems.append(SecretProblem(f"{key}: {text}"))
        return UNREADABLE

    path = Path(path_text)
    if not path.is_absolute():
        cred_dir = os.environ.get(CREDENTIALS_ENV)
        if not cred_dir:
            return bad(f"relative path {path_text!r} needs ${CREDENTIALS_ENV} (systemd "
                       "LoadCredential=); give an absolute path otherwise")
        path = Path(cred_dir) / path
    try:
        st = path.stat()
    except OSError as e:
        return bad(f"cannot read {path}: {e.strerror}")
    private = fs.secret_problem(path, st)
    if private is not None:
        return bad(private)
    try:
        # utf-8-sig: Notepad and PowerShell 5 start the file with a byte order mark.
        value = path.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as e:
        return bad(f"cannot read {path}: {getattr(e, 'strerror', None) or e}")
    if not value:
        return bad(f"{path} is empty")
    return Secret(value)


def _secret(section: _Section, base: str, *, required: bool, what: str) -> Secret | None:
    """`{base}_file` or `{base}_env`: exactly one when required, at most one otherwise."""
    file_key, env_key = f"{base}_file", f"{base}_env"
    path = section.text(file_key)
    env = section.text(env_key)
    if path is not None and env is not None:
        section.problem(file_key, f"give {file_key} or {env_key}, not both")
        return None
    if path is not None:
        return _read_secret_file(path, section.key(file_key), section.problems)
    if env is not None:
        value = os.environ.get(env)
        if not value:
            section.problems.append(SecretProblem(f"{section.key(env_key)}: environment "
                                                  f"variable {env} is not set"))
            return UNREADABLE
        return Secret(value)
    if required:
        section.problems.append(f"{section.key(file_key)}: required ({what}; or {env_key})")
    return None


def _parse_rate(text: str) -> RateLimit:
    m = _RATE_RE.match(text)
    if not m or int(m.group(1)) <= 0:
        raise ValueError('must be a rate such as "30/min" or "2/s"')
    return RateLimit(int(m.group(1)), float(_RATE_UNITS[m.group(2)]))


NO_RATE = RateLimit(0, 1.0)  # mailbox_rate_limit = 0: no limit, not the provider's default


def _parse_rate_or_none(value: str | int) -> RateLimit:
    """A rate, or 0 for none (NO_RATE)."""
    if value in (0, "0"):
        return NO_RATE
    if isinstance(value, int):
        raise ValueError('must be a rate such as "30/min" or "2/s", or 0 for none')
    return _parse_rate(value)


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or systemd's CPU set, not the host's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _parse_server(data: Mapping[str, Any], problems: list[str]) -> ServerConfig:
    s = _Section(data, "server", problems)
    defaults = ServerConfig()
    listen = []
    for i, text in enumerate(s.string_list("listen", ("127.0.0.1:2525",))):
        try:
            listen.append(parse_address(text, allow_zero=True))
        except ValueError as e:
            problems.append(f"server.listen[{i}]: {text!r} {e}")
    listen_tls = []
    for i, text in enumerate(s.string_list("listen_tls")):
        try:
            listen_tls.append(parse_address(text, allow_zero=True))
        except ValueError as e:
            problems.append(f"server.listen_tls[{i}]: {text!r} {e}")
    hostname = s.text("hostname", defaults.hostname)
    if not _HOST_RE.match(hostname):
        s.problem("hostname", "must be a host name")
    size = s.convert("max_message_size", parse_size, (str, int), defaults.max_message_size)
    clients = []
    for i, text in enumerate(s.string_list("allowed_clients", ("127.0.0.0/8", "::1/128"))):
        try:
            clients.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            problems.append(f"server.allowed_clients[{i}]: {text!r} is not an address or network")
    tls_cert = s.text("tls_cert")
    tls_key = s.text("tls_key")
    if (tls_cert is None) != (tls_key is None):
        s.problem("tls_cert", "tls_cert and tls_key go together")
    tls_legacy = s.get("tls_legacy", bool, False)
    # "auto" by default: a process per CPU. With two CPUs, one listener process plus the
    # delivering one outran one process here, and used less CPU a message than two listener
    # processes plus the delivering one, three busy processes on two CPUs (bench/README.md).
    workers = s.get("workers", (int, str), "auto")
    if workers == "auto":
        workers = min(MAX_WORKERS, usable_cpus()) if proc.WORKERS else 1
    elif not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        s.problem("workers", f'must be 1-{MAX_WORKERS} or "auto"')
        workers = 1
    elif workers > 1 and not proc.WORKERS:
        s.problem("workers", 'listener workers run on POSIX only; use 1 or "auto" here')
        workers = 1
    max_sessions = s.get("max_sessions", int, DEFAULT_MAX_SESSIONS)
    if not 1 <= max_sessions <= 100_000:
        s.problem("max_sessions", "must be 1-100000")
        max_sessions = DEFAULT_MAX_SESSIONS
    per_client = s.get("max_sessions_per_client", int, DEFAULT_MAX_SESSIONS_PER_CLIENT)
    if not 1 <= per_client <= 100_000:
        s.problem("max_sessions_per_client", "must be 1-100000")
        per_client = DEFAULT_MAX_SESSIONS_PER_CLIENT
    timeout = s.convert("session_timeout", parse_duration, default=DEFAULT_SESSION_TIMEOUT_S)
    if timeout <= 0:
        s.problem("session_timeout", "must be more than 0s")
        timeout = DEFAULT_SESSION_TIMEOUT_S
    null_route = s.text("null_sender_route")  # checked against the routes in parse_config
    cpu_scheduling = s.text("cpu_scheduling", "batch", choices=CPU_SCHEDULING)
    users: dict[str, ServerUser] = {}
    users_data = s.get("users", dict, {})
    for name, udata in users_data.items():
        if not isinstance(udata, dict):
            problems.append(f"server.users.{name}: must be a table")
            continue
        u = _Section(udata, f"server.users.{name}", problems)
        phash = u.text("password_hash")
        if phash is None:
            u.problem("password_hash", "required (make one with `relayd hash-password`)")
        else:
            from relayd.auth.passwords import check_hash

            why = check_hash(phash)
            if why:
                u.problem("password_hash", why)
        senders = u.string_list("senders")
        if not senders:
            u.problem("senders", "required: the sender patterns this user may use")
        for pattern in senders:
            # "<>": this login may send MAIL FROM:<> (server.null_sender_route)
            why = None if pattern == "<>" else _validate_pattern(ascii_lower(pattern))
            if why:
                u.problem("senders", why)
        u.unknown()
        if phash is not None:
            users[name] = ServerUser(name, Secret(phash),
                                     tuple(ascii_lower(p) for p in senders))
    s.unknown()
    return ServerConfig(
        listen=tuple(listen), hostname=hostname, max_message_size=size,
        allowed_clients=tuple(clients), tls_cert=Path(tls_cert) if tls_cert else None,
        tls_key=Path(tls_key) if tls_key else None, listen_tls=tuple(listen_tls),
        tls_legacy=tls_legacy, users=MappingProxyType(users), workers=workers,
        max_sessions=max_sessions, max_sessions_per_client=per_client,
        session_timeout_s=timeout, null_sender_route=null_route,
        cpu_scheduling=cpu_scheduling,
    )


def _parse_queue(data: Mapping[str, Any], problems: list[str]) -> QueueConfig:
    s = _Section(data, "queue", problems)
    d = QueueConfig()
    path = s.text("path", str(d.path))
    max_age = s.convert("max_age", parse_duration, default=d.max_age_s)
    rmin = s.convert("retry_min", parse_duration, default=d.retry_min_s)
    rmax = s.convert("retry_max", parse_duration, default=d.retry_max_s)
    if rmin <= 0:
        s.problem("retry_min", "must be more than 0s")
    if rmax < rmin:
        s.problem("retry_max", "must not be less than retry_min")
    s.unknown()
    return QueueConfig(Path(path), max_age, rmin, rmax)


def _parse_journal(data: Mapping[str, Any], queue: QueueConfig,
                   problems: list[str]) -> JournalConfig:
    s = _Section(data, "journal", problems)
    d = JournalConfig()
    path = s.text("path", str(queue.path.parent / "journal"))
    keep = s.convert("keep", parse_duration, default=d.keep_s)
    subjects = s.get("subjects", bool, d.subjects)
    if keep < 86400:
        s.problem("keep", "must be at least 1d")
    s.unknown()
    return JournalConfig(Path(path), keep, bool(subjects))


def _parse_web(data: Mapping[str, Any], server: ServerConfig,
               problems: list[str]) -> WebConfig:
    s = _Section(data, "web", problems)
    listen = s.convert("listen", lambda t: parse_address(t, allow_zero=True))
    admins = s.string_list("admins")
    viewers = s.string_list("viewers")
    s.unknown()
    for key, names in (("admins", admins), ("viewers", viewers)):
        for name in names:
            if name not in server.users:
                s.problem(key, f"{name!r} is not a [server.users] name")
    loopback = True
    if listen is not None:
        try:
            loopback = listen.host == "localhost" or ipaddress.ip_address(listen.host).is_loopback
        except ValueError:
            loopback = False
        if not loopback and server.tls_cert is None:
            s.problem("listen", f"{listen} is not a loopback address: the page is served over "
                      "HTTPS with server.tls_cert and server.tls_key, which are not set")
        if not loopback and not admins:
            s.problem("admins", f"required when listen ({listen}) is not a loopback address: "
                      "the [server.users] names that may see the status page")
    return WebConfig(listen, admins, loopback, viewers)


def _parse_notify(data: Mapping[str, Any], problems: list[str]) -> NotifyConfig | None:
    s = _Section(data, "notify", problems)
    to = s.string_list("to")
    if not to:
        s.problem("to", "required: a list of the addresses notices go to")
    for address in to:
        if not _is_address(address):
            s.problem("to", f"{address!r} is not an email address")
    sender = s.text("sender")
    if sender is None:
        s.problem("sender", "required: the From address of notices (it must match a route)")
    elif not _is_address(sender):
        s.problem("sender", f"{sender!r} is not an email address")
    d = NotifyConfig((), "")
    durations = {}
    for key, default in (("deferred_after", d.deferred_after_s),
                         ("expiry_warning", d.expiry_warning_s), ("repeat", d.repeat_s)):
        durations[key] = s.convert(key, parse_duration, default=default)
        if durations[key] <= 0:
            s.problem(key, "must be more than 0s")
    s.unknown()
    if sender is None:
        return None
    # Returned even with problems, so that the sender's route is checked too (all at once).
    return NotifyConfig(tuple(to), sender, durations["deferred_after"],
                        durations["expiry_warning"], durations["repeat"])


def _is_address(text: str) -> bool:
    local, at, domain = text.rpartition("@")
    return bool(at and local and domain) and "*" not in text and \
        not any(c.isspace() or c in "<>,\0" for c in text)


def _check_notify(notify: NotifyConfig, routes: Mapping[str, RouteConfig],
                  problems: list[str]) -> None:
    """The notices go out through the sender's route, to `to`: both must be allowed there."""
    by_pattern = {p: r for r in routes.values() for p in r.senders}
    pattern = best_pattern(notify.sender, by_pattern)
    if pattern is None:
        problems.append(f"notify.sender: {notify.sender!r} matches no route's senders; notices "
                        "go out through the sender's route")
        return
    route = by_pattern[pattern]
    for address in notify.to:
        if not allows(route.recipients, address):
            problems.append(f"notify.to: {address!r} is not allowed by routes.{route.name}"
                            ".recipients, the route of notify.sender")


def _parse_metrics(data: Mapping[str, Any], problems: list[str]) -> MetricsConfig:
    s = _Section(data, "metrics", problems)
    listen = s.convert("listen", lambda t: parse_address(t, allow_zero=True))
    s.unknown()
    return MetricsConfig(listen)


def _parse_auth(data: Mapping[str, Any], problems: list[str]) -> AuthConfig:
    s = _Section(data, "auth", problems)
    d = AuthConfig()
    path = s.text("path", str(d.path))
    key_file = s.text("key_file")
    s.unknown()
    return AuthConfig(Path(path), Path(key_file) if key_file else None)


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


def _parse_oauth(s: _Section, values: dict[str, Any], *, provider: str = "microsoft") -> None:
    """The OAuth keys shared by ews (auth = oauth), graph and smtp (auth = xoauth2)."""
    values["flow"] = s.text("flow", "app", choices=("app", "device"))
    values["client_id"] = s.text("client_id")
    values["tenant_id"] = s.text("tenant_id")
    values["authority"] = s.text("authority")
    if values["authority"] is not None and not values["authority"].startswith("https://"):
        s.problem("authority", "must be an https:// URL")
    if values["client_id"] is None:
        s.problem("client_id", "required for OAuth")
    if provider == "microsoft" and values["tenant_id"] is None:
        s.problem("tenant_id", "required for Microsoft OAuth")
    cert = s.text("certificate_file")
    thumb = s.text("thumbprint")
    has_secret = s.has("client_secret_file") or s.has("client_secret_env")
    if cert is not None and has_secret:
        s.problem("certificate_file", "give client_secret_file/_env or certificate_file, not both")
    if (cert is None) != (thumb is None):
        s.problem("thumbprint", "certificate_file and thumbprint go together")
    values["certificate_file"] = Path(cert) if cert else None
    values["thumbprint"] = thumb
    needs_secret = values["flow"] == "app" and cert is None and provider == "microsoft"
    values["client_secret"] = _secret(s, "client_secret", required=needs_secret,
                                      what="the app's client secret")
    values["client_secret_expires"] = s.convert("client_secret_expires", _parse_date,
                                                (str, datetime.date))


def _parse_date(value: str | datetime.date) -> datetime.date:
    """A calendar date: a TOML date (2027-06-30) or the same as a string."""
    problem = 'must be a date "YYYY-MM-DD"'
    if isinstance(value, datetime.datetime):
        raise ValueError(problem + ", not a date and time")
    if isinstance(value, datetime.date):
        return value
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError(problem)
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise ValueError(problem) from None


def _parse_route(name: str, data: Mapping[str, Any], problems: list[str]) -> RouteConfig | None:
    s = _Section(data, f"routes.{name}", problems)
    start = len(problems)
    senders = s.string_list("senders")
    if not senders:
        s.problem("senders", "required: a list of sender addresses or patterns")
    for pattern in senders:
        why = _validate_pattern(ascii_lower(pattern))
        if why:
            s.problem("senders", why)
    recipients = s.string_list("recipients")
    if s.has("recipients") and not recipients:
        s.problem("recipients", "must list at least one address or pattern (omit it to allow "
                  "any recipient)")
    for pattern in recipients:
        why = _validate_pattern(ascii_lower(pattern))
        if why:
            s.problem("recipients", why)
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
    v["rate_limit"] = s.convert("rate_limit", _parse_rate)
    v["mailbox_rate_limit"] = s.convert("mailbox_rate_limit", _parse_rate_or_none, (str, int))
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

    if upstream == "smtp":
        _parse_smtp_route(s, v)
    elif upstream == "outbox":
        path = s.text("path")
        if path is None:
            s.problem("path", "required: the folder .eml files are written to")
        v["path"] = Path(path) if path else None
    elif upstream == "ews":
        _parse_ews_route(s, v)
    else:
        _parse_graph_route(s, v)
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
    if any(not isinstance(p, SecretProblem) for p in problems[start:]):
        return None
    return RouteConfig(name=name, senders=tuple(ascii_lower(p) for p in senders),
                       recipients=tuple(ascii_lower(p) for p in recipients),
                       upstream=upstream, **v)


def _parse_smtp_route(s: _Section, v: dict[str, Any]) -> None:
    v["host"] = s.text("host")
    if v["host"] is None:
        s.problem("host", "required: the upstream SMTP server")
    elif not _HOST_RE.match(v["host"]):
        s.problem("host", "must be a host name or address")
    v["tls"] = s.text("tls", "starttls", choices=("starttls", "implicit", "none"))
    port = s.get("port", int, 465 if v["tls"] == "implicit" else 587)
    if not 1 <= port <= 65535:
        s.problem("port", "must be 1-65535")
    v["port"] = port
    v["auth"] = s.text("auth", None, choices=("password", "xoauth2", "none"))
    if v["auth"] is None:
        has_pw = s.has("password_file") or s.has("password_env")
        v["auth"] = "password" if has_pw else "none"
    v["username"] = s.text("username")
    if v["auth"] == "none" and v["username"] is not None:
        # Without this relayd would send without SMTP AUTH, and the upstream would refuse the
        # mail (or relay it as anyone's) long after `relayd check` said ok.
        s.problem("username", "given without a password: add password_file (or password_env) "
                  'for SMTP AUTH, or remove username to send without AUTH')
    if v["auth"] == "password":
        if v["username"] is None:
            s.problem("username", 'required with auth = "password"')
        v["password"] = _secret(s, "password", required=True, what="the account's password")
    elif v["auth"] == "xoauth2":
        v["provider"] = s.text("provider", None, choices=("microsoft", "google"))
        if v["provider"] is None:
            s.problem("provider", 'required with auth = "xoauth2": "microsoft" or "google"')
        v["mailbox"] = s.text("mailbox", "sender")
        _parse_oauth(s, v, provider=v["provider"] or "microsoft")
        v["refresh_token"] = _secret(s, "refresh_token", required=False, what="")
        if v["provider"] == "google" and v.get("client_secret") is None \
                and not s.has("client_secret_file") and not s.has("client_secret_env"):
            # Google: a user's refresh token with the app's client secret, or a service
            # account whose JSON key is the client secret. Either way a client secret.
            s.problem("client_secret_file", "required for Google: the OAuth client secret (with "
                      "refresh_token_file) or the service account's JSON key")
    if v["auth"] != "none" and v["tls"] == "none" and v["host"] not in ("127.0.0.1", "::1",
                                                                     "localhost"):
        s.problem("tls", 'credentials would cross the network in clear; use "starttls" or '
                  '"implicit"')


def _parse_mailbox_keys(s: _Section, v: dict[str, Any]) -> None:
    v["mailbox"] = s.text("mailbox", "sender")
    if v["mailbox"] != "sender" and _validate_pattern(v["mailbox"]) is not None:
        s.problem("mailbox", '"sender" or an email address')
    v["save_to_sent"] = s.get("save_to_sent", bool, True)
    v["from_rewrite"] = s.get("from_rewrite", bool, False)
    if v["from_rewrite"] and v["mailbox"] == "sender":
        s.problem("from_rewrite", 'needs a fixed mailbox address (mailbox = "sender" already '
                  "sends as the sender)")


def _parse_ews_route(s: _Section, v: dict[str, Any]) -> None:
    default_auth = "oauth" if s.has("client_id") else "basic"
    v["auth"] = s.text("auth", default_auth, choices=("basic", "ntlm", "oauth"))
    v["server"] = s.text("server")
    v["service_endpoint"] = s.text("service_endpoint")
    if (v["server"] is None) == (v["service_endpoint"] is None):
        s.problem("server", "give server or service_endpoint (exactly one)")
    if v["server"] is not None and not _HOST_RE.match(v["server"]):
        s.problem("server", "must be a host name")
    if v["service_endpoint"] is not None and not v["service_endpoint"].startswith(
            ("https://", "http://")):
        s.problem("service_endpoint", "must be an https:// URL")
    if v["auth"] == "oauth" and (v["service_endpoint"] or "https://").startswith("http://"):
        s.problem("service_endpoint", "OAuth needs an https:// endpoint")
    _parse_mailbox_keys(s, v)
    if v["auth"] in ("basic", "ntlm"):
        v["username"] = s.text("username")
        if v["username"] is None:
            s.problem("username", f'required with auth = "{v["auth"]}"')
        v["password"] = _secret(s, "password", required=True, what="the account's password")
    else:
        _parse_oauth(s, v)
    v["dedupe"] = bool(s.get("dedupe", bool, True))


def _parse_graph_route(s: _Section, v: dict[str, Any]) -> None:
    v["endpoint"] = s.text("endpoint", "https://graph.microsoft.com")
    if not v["endpoint"].startswith("https://"):
        s.problem("endpoint", "must be an https:// URL")
    _parse_mailbox_keys(s, v)
    _parse_oauth(s, v)
    v["dedupe"] = bool(s.get("dedupe", bool, True))


def _check_listeners(server: ServerConfig, problems: list[str]) -> None:
    for i, addr in enumerate(server.listen + server.listen_tls):
        try:
            ip = ipaddress.ip_address(addr.host)
        except ValueError:
            ip = None
        loopback = addr.host == "localhost" or (ip is not None and ip.is_loopback)
        if not loopback and not server.users:
            key = "server.listen" if i < len(server.listen) else "server.listen_tls"
            problems.append(f"{key}: {addr} is not a loopback address; configure [server.users] "
                            "so clients must authenticate")


def _check_patterns(claimed: Mapping[str, Sequence[str]], problems: list[str]) -> None:
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


def parse_config(data: Mapping[str, Any], source: str = "", *,
                 secrets_optional: bool = False) -> Config:
    """Build a Config from parsed TOML, or raise ConfigError listing every problem. With
    `secrets_optional`, secrets that cannot be read are not an error: the Config lacks them
    and lists them in `secret_problems` (for `relayd check --explain`, never for serving)."""
    problems: list[str] = []
    top = _Section(data, "", problems)

    def table(name: str) -> Mapping[str, Any]:
        value = top.get(name, dict, {})
        return value if isinstance(value, dict) else {}

    server = _parse_server(table("server"), problems)
    queue = _parse_queue(table("queue"), problems)
    metrics = _parse_metrics(table("metrics"), problems)
    journal = _parse_journal(table("journal"), queue, problems)
    web = _parse_web(table("web"), server, problems)
    auth = _parse_auth(table("auth"), problems)
    notify = _parse_notify(table("notify"), problems) if "notify" in data else None
    routes: dict[str, RouteConfig] = {}
    claimed: dict[str, list[str]] = {}
    for name, rdata in table("routes").items():
        if not isinstance(rdata, dict):
            problems.append(f"routes.{name}: must be a table")
            continue
        senders = rdata.get("senders")
        if isinstance(senders, list):
            claimed[name] = [ascii_lower(p) for p in senders if isinstance(p, str)]
        route = _parse_route(name, rdata, problems)
        if route is not None:
            routes[name] = route
    if not table("routes"):
        problems.append("routes: at least one [routes.NAME] table is required")
    for name in data:
        if name not in top.used:
            problems.append(f"{name}: unknown section")
    _check_listeners(server, problems)
    _check_patterns(claimed, problems)
    if server.null_sender_route is not None and server.null_sender_route not in routes \
            and server.null_sender_route not in table("routes"):
        problems.append(f"server.null_sender_route: no route named "
                        f"{server.null_sender_route!r} (give the name of a [routes.NAME] table)")
    if notify is not None and not any(p.startswith("routes.") and not isinstance(
            p, SecretProblem) for p in problems):
        _check_notify(notify, routes, problems)
    secret_problems = tuple(str(p) for p in problems if isinstance(p, SecretProblem))
    if secrets_optional and len(secret_problems) == len(problems):
        problems = []
    if problems:
        raise ConfigError([str(p) for p in problems], source)
    return Config(server, queue, metrics, auth, MappingProxyType(routes), source,
                  _warnings(routes), journal, web=web, notify=notify,
                  secret_problems=secret_problems if secrets_optional else ())


def config_path(explicit: str | None) -> str:
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed file, or ConfigError saying why it cannot be read."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        # A UTF-8 byte order mark (Notepad, PowerShell 5) is not TOML: drop it.
        return tomllib.loads(raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError([f"{source}: not UTF-8: {e}"], source) from None
    except FileNotFoundError:
        raise ConfigError([f"{source}: file not found"], source) from None
    except OSError as e:
        raise ConfigError([f"{source}: cannot read: {e.strerror}"], source) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{source}: not valid TOML: {e}"], source) from None


def load_config(path: str | os.PathLike[str], *, secrets_optional: bool = False) -> Config:
    """Read and validate a config file; ConfigError names the file and every bad key."""
    return parse_config(read_toml(path), str(path), secrets_optional=secrets_optional)


def load_server_config(path: str | os.PathLike[str]) -> ServerConfig:
    """Only [server]: for `relayd sendmail`, which runs as any user and so must not need the
    routes' secret files to find the listener."""
    table = read_toml(path).get("server", {})
    problems: list[str] = []
    if not isinstance(table, dict):
        problems.append("server: must be a table")
        table = {}
    server = _parse_server(table, problems)
    if problems:
        raise ConfigError(problems, str(path))
    return server
