"""Loading a config file: read the TOML, parse every section, check across sections, and
raise one ConfigError listing every problem, or return the frozen Config. Apart from it,
`folder_problems`: whether the spool and token folders are private (Windows), which only
`relayd serve` and `relayd check` ask, not every command that loads a config."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from relayd.config.model import CONFIG_ENV, DEFAULT_CONFIG_PATH, Config, RouteConfig, ServerConfig
from relayd.config.routes import check_patterns, parse_route, route_warnings
from relayd.config.sections import (
    check_listeners,
    check_notify,
    parse_auth,
    parse_journal,
    parse_metrics,
    parse_notify,
    parse_queue,
    parse_server,
    parse_web,
)
from relayd.config.values import SecretProblem, Section
from relayd.errors import ConfigError
from relayd.patterns import ascii_lower
from relayd.platform import fs


def parse_config(data: Mapping[str, Any], source: str = "", *,
                 secrets_optional: bool = False) -> Config:
    """Build a Config from parsed TOML, or raise ConfigError listing every problem. With
    `secrets_optional`, secrets that cannot be read are not an error: the Config lacks them
    and lists them in `secret_problems` (for `relayd check --explain`, never for serving)."""
    problems: list[str] = []
    top = Section(data, "", problems)

    def table(name: str) -> Mapping[str, Any]:
        value = top.get(name, dict, {})
        return value if isinstance(value, dict) else {}

    server = parse_server(table("server"), problems)
    queue = parse_queue(table("queue"), problems)
    metrics = parse_metrics(table("metrics"), problems)
    journal = parse_journal(table("journal"), queue, problems)
    web = parse_web(table("web"), server, problems)
    auth = parse_auth(table("auth"), problems)
    notify = parse_notify(table("notify"), problems) if "notify" in data else None
    routes: dict[str, RouteConfig] = {}
    claimed: dict[str, list[str]] = {}
    for name, rdata in table("routes").items():
        if not isinstance(rdata, dict):
            problems.append(f"routes.{name}: must be a table")
            continue
        senders = rdata.get("senders")
        if isinstance(senders, list):
            claimed[name] = [ascii_lower(p) for p in senders if isinstance(p, str)]
        route = parse_route(name, rdata, problems)
        if route is not None:
            routes[name] = route
    if not table("routes"):
        problems.append("routes: at least one [routes.NAME] table is required")
    for name in data:
        if name not in top.used:
            problems.append(f"{name}: unknown section")
    check_listeners(server, problems)
    check_patterns(claimed, problems)
    if server.null_sender_route is not None and server.null_sender_route not in routes \
            and server.null_sender_route not in table("routes"):
        problems.append(f"server.null_sender_route: no route named "
                        f"{server.null_sender_route!r} (give the name of a [routes.NAME] table)")
    if notify is not None and not any(p.startswith("routes.") and not isinstance(
            p, SecretProblem) for p in problems):
        check_notify(notify, routes, problems)
    secret_problems = tuple(str(p) for p in problems if isinstance(p, SecretProblem))
    if secrets_optional and len(secret_problems) == len(problems):
        problems = []
    if problems:
        raise ConfigError([str(p) for p in problems], source)
    return Config(server, queue, metrics, auth, MappingProxyType(routes), source,
                  route_warnings(routes), journal, web=web, notify=notify,
                  secret_problems=secret_problems if secrets_optional else ())


def folder_problems(config: Config) -> list[str]:
    """The spool and token cache folders that others may read (Windows only: their DACL, as
    for secret files; fs.private_dir_problem), one line each naming the key: `relayd serve`
    refuses to start on them and `relayd check` lists them. Folders not made yet pass."""
    found = {"queue.path": fs.private_dir_problem(config.queue.path),
             "auth.path": fs.private_dir_problem(config.auth.path)}
    return [f"{key}: {problem}" for key, problem in found.items() if problem is not None]


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
    server = parse_server(table, problems)
    if problems:
        raise ConfigError(problems, str(path))
    return server
