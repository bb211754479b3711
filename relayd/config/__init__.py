"""TOML -> immutable, validated config objects; every problem reported at once, naming its key.

The package, by what a reader looks for:
- `model`: the frozen types (`Config`, `ServerConfig`, `RouteConfig`, ...) and their defaults.
- `values`: reading one table's values (durations, sizes, addresses, rates, dates, secrets),
  each problem reported under its key; unknown keys found per table.
- `sections`: [server] (with [server.users]), [queue], [journal], [web], [notify], [metrics],
  [auth].
- `routes`: [routes.NAME], each upstream kind with its own keys; the provider switch-off
  warnings.
- `load`: the file (a UTF-8 byte order mark dropped), the checks across sections, one
  ConfigError with every problem.

Everything a caller uses is imported from `relayd.config` itself.
"""

from __future__ import annotations

from relayd.config.load import (
    config_path,
    folder_problems,
    load_config,
    load_server_config,
    parse_config,
    read_toml,
)
from relayd.config.model import (
    CONFIG_ENV,
    CPU_SCHEDULING,
    CREDENTIALS_ENV,
    DEFAULT_CONFIG_PATH,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_GRAPH,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_MAX_SESSIONS_PER_CLIENT,
    DEFAULT_SESSION_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    IMPLEMENTED_UPSTREAMS,
    MAX_WORKERS,
    NO_RATE,
    UPSTREAMS,
    Address,
    AuthConfig,
    Config,
    EwsSettings,
    GraphSettings,
    JournalConfig,
    MetricsConfig,
    NotifyConfig,
    OAuthSettings,
    OutboxSettings,
    QueueConfig,
    RateLimit,
    RouteConfig,
    Secret,
    ServerConfig,
    ServerUser,
    SmtpSettings,
    UpstreamSettings,
    WebConfig,
)
from relayd.config.routes import (
    BASIC_SMTP_AUTH_OFF,
    EWS_BLOCKED,
    EWS_GONE,
    EXCHANGE_ONLINE_EWS_HOSTS,
    EXCHANGE_ONLINE_SMTP_HOSTS,
    GRAPH_EXAMPLE,
    switch_off_warnings,
)
from relayd.config.values import (
    UNREADABLE,
    SecretProblem,
    parse_address,
    parse_duration,
    parse_size,
    usable_cpus,
)
from relayd.errors import ConfigError
from relayd.patterns import ascii_lower

__all__ = [
    "BASIC_SMTP_AUTH_OFF", "CONFIG_ENV", "CPU_SCHEDULING", "CREDENTIALS_ENV",
    "DEFAULT_CONFIG_PATH", "DEFAULT_MAX_CONNECTIONS", "DEFAULT_MAX_CONNECTIONS_GRAPH",
    "DEFAULT_MAX_MESSAGE_SIZE", "DEFAULT_MAX_SESSIONS", "DEFAULT_MAX_SESSIONS_PER_CLIENT",
    "DEFAULT_SESSION_TIMEOUT_S", "DEFAULT_TIMEOUT_S", "EWS_BLOCKED", "EWS_GONE",
    "EXCHANGE_ONLINE_EWS_HOSTS", "EXCHANGE_ONLINE_SMTP_HOSTS", "GRAPH_EXAMPLE",
    "IMPLEMENTED_UPSTREAMS", "MAX_WORKERS", "NO_RATE", "UNREADABLE", "UPSTREAMS", "Address",
    "AuthConfig", "Config", "ConfigError", "EwsSettings", "GraphSettings", "JournalConfig",
    "MetricsConfig", "NotifyConfig", "OAuthSettings", "OutboxSettings", "QueueConfig",
    "RateLimit", "RouteConfig", "Secret", "SecretProblem", "ServerConfig", "ServerUser",
    "SmtpSettings", "UpstreamSettings", "WebConfig", "ascii_lower", "config_path",
    "folder_problems", "load_config", "load_server_config", "parse_address", "parse_config",
    "parse_duration", "parse_size", "read_toml", "switch_off_warnings", "usable_cpus",
]
