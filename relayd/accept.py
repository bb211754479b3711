"""Accepting connections on relayd's listening sockets, the same way on either event loop.

relayd runs on uvloop where it is installed (relayd.loop) and on asyncio's own loop
otherwise, and the two differ where a relay must not: when the process is out of file
descriptors. asyncio logs a traceback on every failed accept(), stops reading the socket for
a second and tries again, and never cancels that retry when the server closes, so a server
stopped in that second logs a ValueError traceback for each (python/cpython#151615). uvloop
(libuv) accepts each waiting connection on a descriptor it keeps in reserve and closes it at
once, so those clients are cut off rather than left waiting (seen here: of 100 connections
under a limit of 64 descriptors, 49 were greeted and 51 closed unanswered); and an error
its reserve cannot absorb reaches uvloop's listen callback, which takes it as fatal to the
server and closes it (uvloop/handles/streamserver.pyx), silently.

The decision, as Postfix's smtpd makes it: a connection waits in the kernel's backlog until a
descriptor is free, so a shortage delays clients rather than turning them away. On EMFILE,
ENFILE, ENOBUFS or ENOMEM (or any other failure of accept()) the socket is left unread for
ACCEPT_RETRY_S and then read again; the log says so at most once a minute, in one line naming
the limit to raise. Closing cancels a pending retry. Every accepted connection becomes a
transport of the running loop's own kind (loop.connect_accepted_socket), so the protocols
never know which loop they run on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

ACCEPT_RETRY_S = 1.0  # asyncio's own delay after a failed accept
ACCEPT_ERROR_LOG_S = 60.0
ACCEPT_BATCH = 100  # connections taken a readiness event at most, as asyncio's backlog loop
OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

_last_warning = -ACCEPT_ERROR_LOG_S  # per process: one line a minute for all listeners


class Acceptor:
    """One listening socket: accepts its connections into protocols from `factory`."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.Protocol]) -> None:
        self.sock = sock
        self.factory = factory
        self.loop = asyncio.get_running_loop()
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[object]] = set()
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                self._pause(e)
                return
            conn.setblocking(False)
            task = self.loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn)
        except OSError as e:  # reset before the transport was made: nothing to serve
            log.debug("connection lost before it was served: %s", e)
            conn.close()

    def _pause(self, error: OSError) -> None:
        """Leave the socket unread a while: accept() would fail again at once (the socket
        stays readable), a tight loop of failures. Any other error is paused the same way,
        so that it too is a line a minute and not a line a loop."""
        global _last_warning
        now = time.monotonic()
        if now - _last_warning >= ACCEPT_ERROR_LOG_S:
            _last_warning = now
            if error.errno in OUT_OF_RESOURCES:
                log.warning("cannot accept connections: %s (raise LimitNOFILE, or lower "
                            "server.max_sessions); new connections wait meanwhile", error)
            else:
                log.warning("cannot accept connections: %s; trying again every %.0f s",
                            error, ACCEPT_RETRY_S)
        self.loop.remove_reader(self.sock.fileno())
        self._retry = self.loop.call_later(ACCEPT_RETRY_S, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._ready)
            self._ready()

    def close(self) -> None:
        """Stop accepting and close the socket; connections already accepted go on."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
