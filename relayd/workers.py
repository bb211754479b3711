"""Listener worker processes (server.workers = N > 1: N - 1 of them, and the main process):
more CPU cores for SMTP sessions.

One Python process tops out on SMTP session handling (aiosmtpd reads DATA line by line; each
message is a dozen socket calls), not on the disk. The main process binds the listening
sockets and starts workers that share them: the kernel hands each new connection to whichever
process accepts first. A worker stores each message durably like any listener, then reports
its queue id on its stdout ("A ID", or "L" for a failed login) before answering 250. The main
process owns the rest: queue manager, queue lock, recovery, control requests, metrics, systemd.
A worker that dies is started again; a worker whose main process is gone stops.
POSIX only (relayd.platform.proc.WORKERS): the sockets go to the workers through pass_fds and
the requests to them as signals; on Windows server.workers is 1.

Why N - 1 listeners and not N: the main process is busy too (about a third of the CPU of each
message goes to scheduling and delivering it), so N listeners plus it were one busy process
more than CPUs. On two CPUs, one listener and the main process used 5-8 % less CPU a message
than two listeners and the main process, and about 32 MiB less memory, for 5-10 % less mail
a second, still above Postfix's by the margin issue 13 asks (bench/README.md, 2026-12-02
morning).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

from relayd import loop as relayd_loop
from relayd.config import load_config
from relayd.errors import ConfigError
from relayd.logsetup import setup_logging
from relayd.platform.proc import Requests
from relayd.service import SESSION_DRAIN_S, Listeners, ListenerWorker

log = logging.getLogger(__name__)

RESPAWN_DELAY_S = 1.0
PARENT_CHECK_S = 1.0
MAX_REPORT_BYTES = 1024  # a line longer than this is not a report; what is kept of it


class Reported(Protocol):
    """Where the workers' reports go: the main process (relayd.app.MainProcess)."""

    def failed_login(self) -> None: ...
    def report_stored(self, queue_id: str) -> None: ...


class WorkerPool:
    """The main process's side: start, watch, signal and stop the workers."""

    def __init__(self, service: Reported, config_path: str, listeners: Listeners, count: int,
                 log_options: Sequence[str] = ()) -> None:
        self.service = service
        self.config_path = config_path
        self.listeners = listeners
        self.count = count
        self.log_options = list(log_options)
        self.procs: dict[int, asyncio.SubprocessTransport] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        for index in range(1, self.count + 1):
            self._tasks.append(asyncio.create_task(self._keep(index), name=f"worker-{index}"))

    async def _keep(self, index: int) -> None:
        """Run worker `index`, reading its reports; start it again if it dies."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            plain = [s.fileno() for s in self.listeners.plain]
            tls = [s.fileno() for s in self.listeners.tls]
            proc, reports = await loop.subprocess_exec(
                lambda: _Reports(lambda line: self._event(index, line), loop.create_future()),
                sys.executable, "-m", "relayd", "_worker", "-c", self.config_path,
                "--index", str(index), "--parent", str(os.getpid()),
                "--plain", ",".join(map(str, plain)),
                "--tls", ",".join(map(str, tls)), *self.log_options,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=None,
                pass_fds=[*plain, *tls])
            pid = proc.get_pid()
            self.procs[index] = proc
            log.info("worker %d started (pid %d)", index, pid)
            await reports.finished  # exited, and every report it wrote has been read
            code = proc.get_returncode()
            proc.close()
            del self.procs[index]
            if self._stopping:
                return
            log.error("worker %d (pid %d) exited with %s; starting it again", index, pid, code)
            await asyncio.sleep(RESPAWN_DELAY_S)

    def _event(self, index: int, line: str) -> None:
        kind, _, queue_id = line.partition(" ")
        if kind == "L":
            self.service.failed_login()
        elif kind == "A" and queue_id:
            self.service.report_stored(queue_id)
        else:
            log.warning("worker %d said something unexpected: %r", index, line[:100])

    def reload(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGHUP)

    async def stop(self, timeout: float) -> None:
        """SIGTERM to every worker; their sessions drain and their last reports come in."""
        self._stopping = True
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for proc in self.procs.values():
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5)
                for task in pending:
                    task.cancel()


class _Reports(asyncio.SubprocessProtocol):
    """A worker's reports, one a line on its stdout, each handled in the callback that reads
    it (a StreamReader read by a task was a task wake-up a message)."""

    def __init__(self, on_line: Callable[[str], None], finished: asyncio.Future[None]) -> None:
        self.on_line = on_line
        self.finished = finished  # done once the worker has exited and its stdout is closed
        self._partial = b""

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        *lines, partial = (self._partial + data).split(b"\n")
        self._partial = partial[:MAX_REPORT_BYTES]  # a report is a few dozen bytes
        for line in lines:
            self.on_line(line.decode("ascii", "replace").strip())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._partial:
            self.on_line(self._partial.decode("ascii", "replace").strip())
        if not self.finished.done():
            self.finished.set_result(None)


def _fds(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def worker_main(argv: Sequence[str]) -> int:
    """`relayd _worker`: what WorkerPool starts. Not a command for people."""
    ap = argparse.ArgumentParser(prog="relayd _worker")
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--index", type=int, default=1)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--plain", default="")
    ap.add_argument("--tls", default="")
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--log-format", default="text")
    args = ap.parse_args(list(argv))
    setup_logging(args.log_level, args.log_format)
    listeners = Listeners([socket.socket(fileno=fd) for fd in _fds(args.plain)],
                          [socket.socket(fileno=fd) for fd in _fds(args.tls)])
    try:
        return relayd_loop.run(_run_worker(args.config, listeners, args.index, args.parent))
    except ConfigError as e:
        for problem in e.problems:
            log.error("worker %d: %s", args.index, problem)
        return 2


async def _run_worker(path: str, listeners: Listeners, index: int, parent: int) -> int:
    # `parent` comes from the main process itself: read here, os.getppid() would already be
    # 1 if the main process died while this one was starting, and the check never fire.
    if os.getppid() != parent:
        log.error("worker %d: the main process is gone before the worker started", index)
        return 1
    stdout = sys.stdout.fileno()

    def report(line: str) -> None:
        os.write(stdout, line.encode("ascii") + b"\n")  # short: one atomic pipe write

    worker = ListenerWorker(load_config(path), listeners=listeners, report=report)
    await worker.start()
    stop = asyncio.Event()

    def on_reload() -> None:
        try:
            worker.reload(load_config(path))
        except ConfigError as e:
            log.error("worker %d: reload refused: %s", index, "; ".join(e.problems))

    with Requests(asyncio.get_running_loop(), lambda _why: stop.set(), on_reload):
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PARENT_CHECK_S)
            if os.getppid() != parent:
                log.error("worker %d: the main process is gone; stopping", index)
                break
        await worker.stop(timeout=SESSION_DRAIN_S)
    return 0
