"""[server], [queue], [journal], [web], [notify], [metrics] and [auth] (the routes are in
relayd.config.routes)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from relayd.config.model import (
    CPU_SCHEDULING,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_MAX_SESSIONS_PER_CLIENT,
    DEFAULT_SESSION_TIMEOUT_S,
    MAX_WORKERS,
    Address,
    AuthConfig,
    JournalConfig,
    MetricsConfig,
    NotifyConfig,
    QueueConfig,
    RouteConfig,
    Secret,
    ServerConfig,
    ServerUser,
    WebConfig,
)
from relayd.config.values import (
    HOST_RE,
    Section,
    is_address,
    parse_address,
    parse_duration,
    parse_size,
    usable_cpus,
)
from relayd.patterns import allows, ascii_lower, best_pattern, validate_pattern
from relayd.platform import proc


def parse_server(data: Mapping[str, Any], problems: list[str]) -> ServerConfig:
    s = Section(data, "server", problems)
    defaults = ServerConfig()
    listen = _parse_listen(s, "listen", ("127.0.0.1:2525",))
    listen_tls = _parse_listen(s, "listen_tls")
    hostname = s.text("hostname", defaults.hostname)
    if not HOST_RE.match(hostname):
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
    workers = _parse_workers(s)
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
    users = _parse_users(s.get("users", dict, {}), problems)
    s.unknown()
    return ServerConfig(
        listen=listen, hostname=hostname, max_message_size=size,
        allowed_clients=tuple(clients), tls_cert=Path(tls_cert) if tls_cert else None,
        tls_key=Path(tls_key) if tls_key else None, listen_tls=listen_tls,
        tls_legacy=tls_legacy, users=users, workers=workers,
        max_sessions=max_sessions, max_sessions_per_client=per_client,
        session_timeout_s=timeout, null_sender_route=null_route,
        cpu_scheduling=cpu_scheduling,
    )


def _parse_listen(s: Section, key: str, default: tuple[str, ...] = ()) -> tuple[Address, ...]:
    """server.listen or server.listen_tls: a list of "host:port" (port 0: any free port)."""
    listen = []
    for i, text in enumerate(s.string_list(key, default)):
        try:
            listen.append(parse_address(text, allow_zero=True))
        except ValueError as e:
            s.problems.append(f"server.{key}[{i}]: {text!r} {e}")
    return tuple(listen)


def _parse_workers(s: Section) -> int:
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
    return int(workers)


def _parse_users(users_data: Mapping[str, Any], problems: list[str]) -> Mapping[str, ServerUser]:
    """[server.users.NAME]: the logins clients authenticate with, and the senders each may use."""
    users: dict[str, ServerUser] = {}
    for name, udata in users_data.items():
        if not isinstance(udata, dict):
            problems.append(f"server.users.{name}: must be a table")
            continue
        u = Section(udata, f"server.users.{name}", problems)
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
            why = None if pattern == "<>" else validate_pattern(ascii_lower(pattern))
            if why:
                u.problem("senders", why)
        u.unknown()
        if phash is not None:
            users[name] = ServerUser(name, Secret(phash),
                                     tuple(ascii_lower(p) for p in senders))
    return MappingProxyType(users)


def parse_queue(data: Mapping[str, Any], problems: list[str]) -> QueueConfig:
    s = Section(data, "queue", problems)
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


def parse_journal(data: Mapping[str, Any], queue: QueueConfig,
                   problems: list[str]) -> JournalConfig:
    s = Section(data, "journal", problems)
    d = JournalConfig()
    path = s.text("path", str(queue.path.parent / "journal"))
    keep = s.convert("keep", parse_duration, default=d.keep_s)
    subjects = s.get("subjects", bool, d.subjects)
    if keep < 86400:
        s.problem("keep", "must be at least 1d")
    s.unknown()
    return JournalConfig(Path(path), keep, bool(subjects))


def parse_web(data: Mapping[str, Any], server: ServerConfig,
               problems: list[str]) -> WebConfig:
    s = Section(data, "web", problems)
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


def parse_notify(data: Mapping[str, Any], problems: list[str]) -> NotifyConfig | None:
    s = Section(data, "notify", problems)
    to = s.string_list("to")
    if not to:
        s.problem("to", "required: a list of the addresses notices go to")
    for address in to:
        if not is_address(address):
            s.problem("to", f"{address!r} is not an email address")
    sender = s.text("sender")
    if sender is None:
        s.problem("sender", "required: the From address of notices (it must match a route)")
    elif not is_address(sender):
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


def check_notify(notify: NotifyConfig, routes: Mapping[str, RouteConfig],
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


def parse_metrics(data: Mapping[str, Any], problems: list[str]) -> MetricsConfig:
    s = Section(data, "metrics", problems)
    listen = s.convert("listen", lambda t: parse_address(t, allow_zero=True))
    s.unknown()
    return MetricsConfig(listen)


def parse_auth(data: Mapping[str, Any], problems: list[str]) -> AuthConfig:
    s = Section(data, "auth", problems)
    d = AuthConfig()
    path = s.text("path", str(d.path))
    key_file = s.text("key_file")
    s.unknown()
    return AuthConfig(Path(path), Path(key_file) if key_file else None)


def check_listeners(server: ServerConfig, problems: list[str]) -> None:
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
