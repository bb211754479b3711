"""Reading values out of TOML tables: one section's keys (`Section`, which also finds the
unknown ones), durations, sizes, addresses, rates, dates and secrets. Each helper reports a
problem under its key and goes on, so that one load reports everything wrong with the file.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from relayd.config.model import CREDENTIALS_ENV, NO_RATE, Address, RateLimit, Secret
from relayd.platform import fs

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB)?\s*$", re.IGNORECASE)


_SIZE_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3}


_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$")


_RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
               "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


HOST_RE = re.compile(r"^[A-Za-z0-9._:-]+$")


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


class Section:
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


def read_secret(section: Section, base: str, *, required: bool, what: str) -> Secret | None:
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


def parse_rate(text: str) -> RateLimit:
    m = _RATE_RE.match(text)
    if not m or int(m.group(1)) <= 0:
        raise ValueError('must be a rate such as "30/min" or "2/s"')
    return RateLimit(int(m.group(1)), float(_RATE_UNITS[m.group(2)]))


def parse_rate_or_none(value: str | int) -> RateLimit:
    """A rate, or 0 for none (NO_RATE)."""
    if value in (0, "0"):
        return NO_RATE
    if isinstance(value, int):
        raise ValueError('must be a rate such as "30/min" or "2/s", or 0 for none')
    return parse_rate(value)


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or systemd's CPU set, not the host's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def is_address(text: str) -> bool:
    local, at, domain = text.rpartition("@")
    return bool(at and local and domain) and "*" not in text and \
        not any(c.isspace() or c in "<>,\0" for c in text)


def parse_date(value: str | datetime.date) -> datetime.date:
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
