"""Logging for every relayd process (`relayd serve`, its listener workers, the Windows
service, the short commands): one line a record, on stderr, as text or JSON.

Its own module so that what starts a process (relayd.cli, relayd.workers, relayd.winservice)
can set it up without importing one another.

Private names used here: none. Removed in issue 24: `logging._srcfile = None`, which spared
every record the walk up the stack for its file and line: 1.1 us a record (6.2 against 7.3 us
for a relayd line through this formatter, timeit), about 0.3 % of a message's CPU at the two or
three lines a message logs, for a library's private global set process-wide.
"""

from __future__ import annotations

import logging
import sys
import time

from relayd.escape import json_line, visible


class _Formatter(logging.Formatter):
    """logging's formatter with the date and time formatted once a second, not per line (two
    lines a message under load, and time.strftime is most of formatting one)."""

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, time.strftime(self.default_time_format,
                                                           self.converter(record.created)))
        return f"{cached[1]},{int(record.msecs):03d}"  # as logging.Formatter.default_msec_format

    def formatMessage(self, record: logging.LogRecord) -> str:
        # A line may carry a client's or an upstream's text: one record, one line, no
        # terminal controls (relayd.escape). A traceback is appended after this, as it is.
        record.message = visible(record.message)
        return super().formatMessage(record)


class _JsonFormatter(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json_line(out)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    # Neither format prints the process or thread, and each LogRecord would ask for them
    # (os.getpid() is a system call a line).
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command line at INFO (AUTH lines included): keep it to warnings.
    for noisy in ("mail.log", "aiosmtplib", "exchangelib", "msal", "httpx", "httpcore",
                  "urllib3", "requests_ntlm"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
