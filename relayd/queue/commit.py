"""The group commit: the spool's writer thread, which makes accepted messages durable in
batches (one directory fsync for all the files of a batch), removes delivered files in
batches, and writes small side files (the mailboxes' counts); and `Draft`, a message file
written as it arrives and sealed by that thread. Decisions are in GroupCommit's docstring."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from relayd.errors import QueueError
from relayd.platform import fs
from relayd.queue.entry import Entry
from relayd.queue.spares import Spares

log = logging.getLogger("relayd.queue")

REMOVE_DELAY_S = 0.02  # delivered files wait this long for others, to be removed together
REMOVE_BATCH = 32  # ... or until this many wait


class GroupCommit:
    """Makes accepted messages durable in batches, on one thread of its own.

    Sessions that finish DATA at about the same moment hand their files to this thread, which
    writes, fsyncs and renames each into msg/, fsyncs msg/ once for all of them, and wakes them
    all with one callback. Compared with a thread-pool hop per file, this keeps the event loop
    and the thread from trading the GIL back and forth for every system call (measured: most of
    relayd's time under load went to futex waits), and turns N directory fsyncs into one.
    """

    def __init__(self, msg_dir: Path, tmp_dir: Path, spares: Spares | None) -> None:
        self.msg_dir = msg_dir
        self.tmp_dir = tmp_dir
        self.spares = spares
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: list[tuple[str, bytes | Draft, asyncio.Future[None]]] = []
        self._unlinks: list[tuple[str, int | None]] = []  # (path, size if known)
        self._unlinks_since = 0.0  # when the oldest file in _unlinks was handed over
        self._side: dict[str, bytes] = {}  # path -> the newest bytes to write there (put)
        self._msg_prefix = os.path.join(msg_dir, "")
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, queue_id: str, blob: bytes | Draft) -> asyncio.Future[None]:
        """The returned future completes once the file and its directory entry are on disk:
        `blob` written to a new file, or a draft's file synced and renamed into msg/."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._closed:
                raise QueueError("the queue is shutting down")
            self._pending.append((queue_id, blob, future))
            self._start()
            self._wake.notify()
        return future

    def discard(self, paths: Sequence[str], size: int | None = None) -> bool:
        """Unlink files (or keep them as spares) on the writer thread (unlink takes a quarter
        of a millisecond here, too long for the event loop); nobody waits for it. The
        daemon's spool (the one with spares) starts the thread for it: with listener workers,
        the main process removes messages it never wrote. False when the thread is not
        running for a spool without spares (a command's, which the caller unlinks itself).
        `size`: the message file's, when known (Spares.keep)."""
        with self._lock:
            if self._closed or (self._thread is None and self.spares is None):
                return False
            waiting = len(self._unlinks)
            if not waiting:
                self._unlinks_since = time.monotonic()
            self._unlinks.extend((path, size) for path in paths)
            self._start()
            if not waiting or len(self._unlinks) >= REMOVE_BATCH > waiting:
                self._wake.notify()  # the first starts the clock (_next); a batch is due
        return True

    def put(self, path: str, data: bytes) -> bool:
        """Write a small file atomically on the writer thread, the newest bytes given for a
        path replacing older ones not yet written; nobody waits. False after close."""
        with self._lock:
            if self._closed:
                return False
            self._side[path] = data
            self._start()
            self._wake.notify()
        return True

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=30)

    def _next(self) -> None:
        """Under the lock: wait until files are to be written, or the removals are due (the
        oldest waited REMOVE_DELAY_S, or REMOVE_BATCH are waiting), or a spare is to be
        emptied (Spares.scrub). Waking this thread for every delivered message was a futex
        wake-up and a GIL hand-over a message; removals wait for no one, so they are
        gathered."""
        while not self._pending and not self._closed and not self._side:
            now = time.monotonic()
            due = math.inf
            if self._unlinks:
                if len(self._unlinks) >= REMOVE_BATCH:
                    return
                due = self._unlinks_since + REMOVE_DELAY_S
            if self.spares is not None:
                due = min(due, self.spares.next_scrub())
            if due <= now:
                return
            self._wake.wait(None if due == math.inf else due - now)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._next()
                batch, self._pending = self._pending, []
                unlinks, self._unlinks = self._unlinks, []
                side, self._side = self._side, {}
                # Stop only with nothing left: removals handed over while the last ones were
                # being done are done too (a file left in msg/ is delivered again after the
                # restart). After close, discard and submit take nothing more.
                if self._closed and not batch and not unlinks and not side:
                    if self.spares is not None:
                        self.spares.scrub(math.inf, None)  # no delivered message's bytes stay
                    return
            for path, size in unlinks:
                if self.spares is not None and path.startswith(self._msg_prefix) and \
                        self.spares.keep(path, size):
                    continue
                try:
                    fs.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as e:  # the thread goes on; the file is seen again at start
                    log.error("queue: cannot remove %s: %s", path, e)
            for path, data in side.items():
                try:
                    fs.write_atomic(path, data, self.tmp_dir)
                except OSError as e:
                    log.warning("queue: cannot write %s: %s", path, e)
            if self.spares is not None:
                # A few at a time: messages being stored wait for this thread.
                self.spares.scrub(time.monotonic(), REMOVE_BATCH)
            if not batch:
                continue
            error: BaseException | None = None
            written = 0
            try:
                for queue_id, blob, _ in batch:
                    if isinstance(blob, Draft):
                        blob.seal(self._msg_prefix + queue_id)
                    else:
                        fs.write_atomic(self._msg_prefix + queue_id, blob, self.tmp_dir,
                                     sync_dir=False, spares=self.spares)
                    written += 1
                fs.sync_dir(self.msg_dir)
            except BaseException as e:  # reported to every waiter; the thread goes on
                error = e
                for _, blob, _ in batch[written:]:
                    if isinstance(blob, Draft):
                        blob.discard()
            loop = batch[0][2].get_loop()
            try:
                loop.call_soon_threadsafe(_settle, batch, error, written)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more


def _settle(batch: list[tuple[str, bytes | Draft, asyncio.Future[None]]],
            error: BaseException | None,
            written: int) -> None:
    """On the event loop: wake the sessions of one batch. Without a directory fsync nothing
    in the batch is durable, so an error fails all of it (the files already renamed are then
    delivered after a restart at worst: the client, told 451, may send them again)."""
    for _, _, future in batch:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(QueueError(f"cannot store the message: {error}"))


class Draft:
    """A message file being written as the message arrives (Postfix's cleanup writes as it
    reads): its envelope first, then the bytes, in tmp/ until the spool commits it. Memory does
    not depend on the message's size. A draft never committed leaves at most a file in tmp/,
    which was never acknowledged and goes at the next start."""

    def __init__(self, entry: Entry, header: bytes, tmp_dir: Path,
                 spares: Spares | None = None) -> None:
        self.entry = entry
        self.fd: int | None = None
        self.fd, self.tmp, self._spare = fs.create_tmp(tmp_dir, entry.id, spares)
        try:
            fs.write_all(self.fd, header)
        except BaseException:
            self.discard()
            raise

    def write(self, data: bytes) -> None:
        """Append message bytes (OSError, ENOSPC say, leaves the draft to be discarded)."""
        assert self.fd is not None, "draft already sealed or discarded"
        fs.write_all(self.fd, data)
        self.entry.size += len(data)

    def seal(self, path: str) -> None:
        """fsync and rename into msg/ (the caller fsyncs msg/); on the writer thread."""
        assert self.fd is not None, "draft already sealed or discarded"
        fd, self.fd = self.fd, None
        fs.seal(fd, self.tmp, path, self.entry.file_size if self._spare else None)

    def discard(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            fs.drop(fd, self.tmp)
