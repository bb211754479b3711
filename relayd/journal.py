"""The delivery journal: one JSON line per event in a message's life, kept `journal.keep` days,
and the reader behind `relayd log`.

Rules:
- Files by day (UTC), `YYYY-MM-DD.jsonl` under `journal.path`, mode 0640. Each line is one event:
  `accepted`, `delivered`, `deferred`, `failed`, `bounced`, `expired`, `deleted`,
  `found-in-sent-items`, `retry` (asked in the web console; it and `deleted` from there name the
  `admin`; a retry of all of a route's messages is one event, queue id `*`, with `count`),
  with the time, queue id, Message-ID, envelope sender, the recipients it
  concerns, the route, and the upstream's answer where there is one.
- Written off the event loop, by one thread, in batches (every `FLUSH_S` or `BATCH_EVENTS`), with
  no fsync: a crash may lose the last second of records, never mail, and never corrupts an
  earlier line. A torn last line is skipped by the reader.
- A journal that cannot be written never stops mail: the events are dropped, `healthy` turns
  False (so `/healthz` answers 503 and a metric counts the drops), and one log line a minute at
  most says why. It recovers by itself when the directory takes writes again.
- Never a secret, a token or message content beyond the Subject (`journal.subjects = false`
  leaves that out too).
Rejected alternative: SQLite. One more file format to migrate and lock, for lookups that a
substring pre-filter over the day files answers in well under a second for a year of a small
firm's mail (bench/journal_lookup.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relayd.config import JournalConfig
from relayd.escape import json_line, visible
from relayd.platform import fs

log = logging.getLogger(__name__)

FLUSH_S = 0.5
BATCH_EVENTS = 1000
MAX_PENDING = 100_000  # beyond this (a stuck disk), new events are dropped and counted
ERROR_LOG_INTERVAL_S = 60.0
PRUNE_INTERVAL_S = 3600.0
FILE_MODE = 0o640
FILE_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.jsonl$")

EVENTS = ("accepted", "delivered", "deferred", "failed", "bounced", "expired", "deleted",
          "found-in-sent-items", "retry")


def day_of(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


class Journal:
    """The writer: `record` is cheap and never raises; a thread does the I/O."""

    def __init__(self, settings: JournalConfig, clock: Any = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.healthy = True
        self.dropped = 0
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._last_error_log = 0.0
        self._last_prune = 0.0

    def record(self, event: str, queue_id: str, **fields: Any) -> None:
        item: dict[str, Any] = {"time": round(self.clock(), 3), "event": event, "id": queue_id}
        for key, value in fields.items():
            if value is None or value == "" or value == []:
                continue
            if key == "subject" and not self.settings.subjects:
                continue
            item[key] = value
        # Escaped (relayd.escape): a Subject with U+2028 or ESC stays one inert line.
        line = json_line(item, separators=(",", ":"), default=str)
        with self._lock:
            if self._closed:
                return
            if len(self._pending) >= MAX_PENDING:
                self.dropped += 1
                return
            self._pending.append(line)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
                self._thread.start()
            if len(self._pending) >= BATCH_EVENTS:
                self._wake.notify()

    def close(self) -> None:
        """Write what is pending and stop the thread."""
        with self._lock:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._pending and not self._closed:
                    self._wake.wait(FLUSH_S)
                batch, self._pending = self._pending, []
                closed = self._closed
            if batch:
                self._write(batch)
            self._prune_now_and_then()
            if closed and not batch:
                return

    def _write(self, lines: Sequence[str]) -> None:
        path = self.settings.path / f"{day_of(self.clock())}.jsonl"
        data = ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
        try:
            self.settings.path.mkdir(mode=0o750, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | fs.O_BINARY, FILE_MODE)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError as e:
            self.dropped += len(lines)
            if self.healthy or time.monotonic() - self._last_error_log >= ERROR_LOG_INTERVAL_S:
                self._last_error_log = time.monotonic()
                log.error("journal: cannot write %s (%s); %d event(s) dropped so far; mail is "
                          "not affected", path, e.strerror or e, self.dropped)
            self.healthy = False
            return
        if not self.healthy:
            log.info("journal: %s takes writes again", self.settings.path)
        self.healthy = True

    def _prune_now_and_then(self) -> None:
        now = time.monotonic()
        if self._last_prune and now - self._last_prune < PRUNE_INTERVAL_S:
            return
        self._last_prune = now
        prune(self.settings.path, self.settings.keep_s, self.clock())


def prune(path: Path, keep_s: float, now: float) -> list[Path]:
    """Remove day files older than `keep_s`; returns what was removed."""
    oldest = day_of(now - keep_s)
    removed = []
    with contextlib.suppress(OSError):
        for name in os.listdir(path):
            m = FILE_RE.match(name)
            if m and m.group(1) < oldest:
                with contextlib.suppress(OSError):
                    os.unlink(path / name)
                    removed.append(path / name)
    return removed


# -- reading (relayd log) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    queue_id: str | None = None
    message_id: str | None = None
    sender: str | None = None  # "" selects the null sender's events
    recipient: str | None = None
    route: str | None = None
    since: float | None = None  # epoch seconds

    def needle(self) -> str | None:
        """A substring every matching line must contain (case-folded), to skip JSON parsing of
        the lines that cannot match: what makes a lookup in a year of mail fast."""
        for value in (self.message_id, self.queue_id, self.recipient, self.sender):
            if value:
                return value.lower()
        return None

    def matches(self, e: Mapping[str, Any]) -> bool:
        if self.since is not None and float(e.get("time", 0)) < self.since:
            return False
        if self.queue_id and self.queue_id not in (e.get("id"), e.get("bounce_for")):
            return False
        if self.message_id and _mid(self.message_id) != _mid(str(e.get("message_id", ""))):
            return False
        # sender "" is the null sender (bounces), whose events carry no "from"
        if self.sender is not None and self.sender.lower() != str(e.get("from", "")).lower():
            return False
        if self.recipient:
            rcpts = [str(r).lower() for r in e.get("to", [])]
            if self.recipient.lower() not in rcpts:
                return False
        return not (self.route and self.route != e.get("route"))


def _mid(text: str) -> str:
    return text.strip().strip("<>").lower()


def read(path: Path, query: Query) -> Iterator[dict[str, Any]]:
    """Matching events, oldest first. Unreadable or torn lines are skipped."""
    try:
        names = sorted(n for n in os.listdir(path) if FILE_RE.match(n))
    except FileNotFoundError:
        return
    first_day = day_of(query.since) if query.since is not None else ""
    needle = query.needle()
    if needle and query.message_id:
        needle = _mid(query.message_id)
    for name in names:
        if name[:10] < first_day:
            continue
        try:
            with open(path / name, "rb") as f:
                lines: Iterable[bytes] = f.read().split(b"\n")
        except OSError as e:
            log.warning("journal: cannot read %s: %s", path / name, e.strerror)
            continue
        for raw in lines:
            if not raw:
                continue
            if needle is not None:
                text = raw.decode("utf-8", "surrogateescape")
                if needle not in text.lower():
                    continue
            try:
                event = json.loads(raw)
            except ValueError:
                continue  # a torn last line after a crash
            if isinstance(event, dict) and query.matches(event):
                yield event


def read_back(path: Path, query: Query, before: str | None,
              limit: int) -> tuple[list[dict[str, Any]], str | None]:
    """A page of matching events, newest first: at most `limit`, from before the cursor
    `before` ("YYYY-MM-DD:LINE", the page's last event, as returned), and the cursor of the next
    page (None: no older events). Only the day files the page reaches are read: paging
    through a year reads each day once, not the year on every page (the web console's /log)."""
    try:
        names = sorted((n for n in os.listdir(path) if FILE_RE.match(n)), reverse=True)
    except FileNotFoundError:
        return [], None
    first_day = day_of(query.since) if query.since is not None else ""
    stop_day, stop_line = "9999-99-99", -1
    if before:
        day, _, line = before.partition(":")
        if FILE_RE.match(day + ".jsonl") and line.isdigit():
            stop_day, stop_line = day, int(line)
    needle = query.needle()
    if needle and query.message_id:
        needle = _mid(query.message_id)
    out: list[dict[str, Any]] = []
    for name in names:
        day = name[:10]
        if day > stop_day:
            continue
        if day < first_day:
            break
        try:
            with open(path / name, "rb") as f:
                lines = f.read().split(b"\n")
        except OSError as e:
            log.warning("journal: cannot read %s: %s", path / name, e.strerror)
            continue
        end = stop_line if day == stop_day and stop_line >= 0 else len(lines)
        for index in range(min(end, len(lines)) - 1, -1, -1):
            raw = lines[index]
            if not raw:
                continue
            if needle is not None and needle not in raw.decode("utf-8",
                                                               "surrogateescape").lower():
                continue
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if isinstance(event, dict) and query.matches(event):
                out.append(event)
                if len(out) >= limit:
                    return out, f"{day}:{index}"
    return out, None


def parse_since(text: str, now: float) -> float:
    """`2h`, `3d`, `45m`, or a date `2026-11-30` (UTC midnight)."""
    m = re.fullmatch(r"(\d+)\s*([smhd])", text.strip())
    if m:
        return now - int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        day = dt.datetime.strptime(text.strip(), "%Y-%m-%d").replace(tzinfo=dt.UTC)
    except ValueError:
        raise ValueError(f"--since {text!r}: use 2h, 3d or YYYY-MM-DD") from None
    return day.timestamp()


def format_event(e: Mapping[str, Any]) -> str:
    """One readable line: local time, event, queue id, then what the event carries."""
    when = dt.datetime.fromtimestamp(float(e.get("time", 0))).strftime("%Y-%m-%d %H:%M:%S")
    parts = [when, f"{visible(str(e.get('event', '?'))):<19}", visible(str(e.get("id", "-")))]
    for key, label in (("message_id", "msgid"), ("from", "from"), ("to", "to"),
                       ("route", "route"), ("upstream", "upstream"), ("attempt", "attempt"),
                       ("client", "client"), ("login", "login"), ("size", "size"),
                       ("subject", "subject"), ("bounce", "bounce"),
                       ("bounce_for", "bounce_for"), ("status", "status"),
                       ("latency_s", "latency"), ("next_try", "next_try"),
                       ("reply", "reply"), ("doubt", "doubt"),
                       ("may_duplicate", "may_duplicate"), ("admin", "admin"),
                       ("count", "count")):
        value = e.get(key)
        if value in (None, "", []):
            continue
        if isinstance(value, list):
            value = ",".join(f"<{v}>" for v in value)
        elif key in ("from",):
            value = f"<{value}>"
        elif key == "next_try":
            value = dt.datetime.fromtimestamp(float(value)).strftime("%Y-%m-%d %H:%M:%S")
        # Client and upstream text, escaped (relayd.escape): one event, one line, inert.
        text = visible(str(value))
        if " " in text or '"' in text:
            text = '"' + text.replace('"', '\\"') + '"'
        parts.append(f"{label}={text}")
    return " ".join(parts)
