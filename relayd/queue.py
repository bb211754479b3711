"""The durable spool: the files of the queue directory, and nothing about scheduling.

Layout under `queue.path` (Postfix keeps a similar split between content and state):
  msg/ID      one line of JSON (the envelope), a newline, then the message bytes exactly as
              received; written once to tmp/, fsynced, renamed into msg/, msg/ fsynced.
  state/ID    per-recipient delivery state (JSON), replaced atomically after an attempt that
              leaves work to do. No state file means every recipient is still pending.
  state/mailboxes  each sending mailbox's recent recipient counts (relayd.qmgr.pacing),
              written by the writer thread at most once a second while they change.
  corrupt/    entries that could not be read, moved aside with a .why file beside them.
  control/    requests from `relayd queue retry|delete` while the daemon runs.
  tmp/        files being written, and spent message files kept for reuse (`Spares`);
              anything left here after a crash was never acknowledged.
  lock        held by the running daemon (relayd.platform.fs: flock; on Windows a byte lock).

Every file is closed before it is renamed or removed (NTFS refuses both on an open file;
relayd.platform.fs has the checker that the tests switch on).

Whether a message is being delivered, held or deferred is the queue manager's, in memory
(relayd.qmgr), so after a crash every entry is simply due again: at most the message that was
in flight is delivered twice. A bounce's envelope names the message and recipients it reports
(`bounce_for`), so recovery can tell which failures are already bounced even when the crash came
between storing the bounce and recording the failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relayd.errors import QueueError, SpoolBusyError
from relayd.platform import fs

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUBDIRS = ("msg", "state", "corrupt", "control", "tmp")
ID_RE = re.compile(r"^[0-9A-Z]{10,20}$")
MAX_HEADER_BYTES = 1024 * 1024  # an envelope line longer than this is corrupt
HEADER_READ_BYTES = 8192  # first read of a message file: the envelope (and all of a small one)
STATE_READ_BYTES = 65536
INTERN_MAX = 65536  # distinct envelope strings shared between entries (see _intern)
SPARE_NAME = "spare"  # tmp/spare.PID.N
SPARES_MAX = 256  # spent message files kept in tmp/ (about the messages in flight at a time)
SPARES_COUNT_EVERY = 64  # files removed between two counts of the spares in tmp/
SPARES_SCAN_S = 0.05  # at most this often, tmp/ is listed for spares other processes left
SPARE_SCRUB_S = 1.0  # a spare still holding a delivered message's bytes is emptied by then
SCRUB_EVERY_S = 0.25  # ... by a pass this often over those kept longest (one listing of tmp/)
SPARE_FULL_MAX = 64 * 1024  # a larger file is emptied as it becomes a spare (its blocks freed)
SCRUB_NAME = "scrub"  # tmp/scrub.PID.N: a spare claimed for emptying
REMOVE_DELAY_S = 0.02  # delivered files wait this long for others, to be removed together
REMOVE_BATCH = 32  # ... or until this many wait
REMOVED_KEEP_S = 30.0  # ids removed this recently are never taken for unknown entries (scan)
USAGE_FILE = "mailboxes"  # in state/: the mailboxes' counts (not a queue id: recover skips it)

QUEUE_ACTIONS = ("retry", "delete")  # control/ requests the queue manager takes
CONTROL_ACTIONS = (*QUEUE_ACTIONS, "reload")  # and the daemon's lifecycle ("reload")

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"


_ID_TAIL_SPACE = 36 ** 5
_id_tail = itertools.count(secrets.randbelow(_ID_TAIL_SPACE))  # random start per process


def new_id() -> str:
    """Sortable by arrival (microseconds, base 36), then 5 characters that differ between
    messages of one microsecond: a counter from a random start per process (listener workers
    are separate processes), not a random read per message, which costs a system call."""
    micros = int(time.time() * 1_000_000)
    tail = next(_id_tail) % _ID_TAIL_SPACE
    return _base36(micros).rjust(11, "0") + _base36(tail).rjust(5, "0")


def _base36(n: int) -> str:
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out or "0"


@dataclass(slots=True)
class RecipientState:
    status: str = PENDING
    code: int | None = None
    text: str = ""


@dataclass(slots=True)
class Entry:
    """One queued message: its envelope and delivery state. The bytes stay on disk.

    The queue manager holds one per queued message (100,000 with an upstream down), so it is
    kept small: slots, envelope strings shared between entries (`_intern`), and no list of
    its own for the bounce recipients of a message that is not a bounce."""

    id: str
    sender: str
    recipients: list[str]
    received: float
    mail_options: Sequence[str] = ()  # a list when there are any (one tuple shared if none)
    client: str = ""
    route: str | None = None  # pinned route (bounces go back through the original's route)
    message_id: str = ""  # the Message-ID header, for the journal and dedupe
    login: str = ""  # the listener login it came with, if any
    bounce_for: str | None = None  # a bounce: the queue id of the message it reports
    bounce_rcpts: Sequence[str] = ()  # and the recipients it reports
    size: int = 0
    data_offset: int = 0
    attempts: int = 0
    backoff: int = 0  # failed tries since the last retry request
    started: int = 0  # dedupe: the attempt that was sent and not yet reported (0: none)
    doubt: str = ""  # dedupe: why that attempt may have gone out (relayd.delivery.doubt)
    doubt_at: float = 0.0  # and when it ended (epoch seconds)
    next_attempt: float = 0.0
    last_error: str = ""
    rcpt: dict[str, RecipientState] = field(default_factory=dict)
    has_state: bool = False  # a state/ file exists for it

    @property
    def is_bounce(self) -> bool:
        return self.sender == ""

    @property
    def file_size(self) -> int:
        """Its msg/ file's: the envelope line, then the message."""
        return self.data_offset + self.size

    def pending(self) -> list[str]:
        return [r for r in self.recipients if self.rcpt[r].status == PENDING]

    def envelope_json(self) -> dict[str, Any]:
        env = {"v": FORMAT_VERSION, "id": self.id, "sender": self.sender,
               "recipients": self.recipients, "received": self.received,
               "mail_options": self.mail_options, "client": self.client, "route": self.route}
        if self.bounce_for is not None:
            env["bounce_for"] = {"id": self.bounce_for, "recipients": self.bounce_rcpts}
        if self.message_id:
            env["message_id"] = self.message_id
        if self.login:
            env["login"] = self.login
        return env

    def state_json(self) -> dict[str, Any]:
        state = {"attempts": self.attempts, "backoff": self.backoff, "started": self.started,
                 "next_attempt": self.next_attempt, "last_error": self.last_error,
                 "rcpt": {r: {"status": s.status, "code": s.code, "text": s.text}
                          for r, s in self.rcpt.items()}}
        if self.doubt:
            state["doubt"] = {"why": self.doubt, "at": self.doubt_at}
        return state

    def summary(self) -> dict[str, Any]:
        """What `relayd queue list/show` print."""
        return {**self.envelope_json(), "size": self.size, **self.state_json()}


class _GroupCommit:
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
                    write_atomic(path, data, self.tmp_dir)
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
                        write_atomic(self._msg_prefix + queue_id, blob, self.tmp_dir,
                                     sync_dir=False, spares=self.spares)
                    written += 1
                fsync_dir(self.msg_dir)
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


def fsync_dir(path: Path | str) -> None:
    """Make renames into `path` durable (relayd.platform.fs.sync_dir)."""
    fs.sync_dir(path)


_tmp_serial = itertools.count()


def _tmp_name(tmp_dir: Path | str, name: str) -> str:
    """A name in tmp/ unique by process id and a counter (O_EXCL or a claim's rename would
    refuse a clash), not by random bytes, a system call a message."""
    return os.path.join(tmp_dir, f"{name}.{os.getpid()}.{next(_tmp_serial)}")


class Spares:
    """Spent message files, kept in tmp/ for the next messages instead of unlinked.

    Each message is a file that lives for moments: created, written, fsynced, renamed into
    msg/, delivered, removed. On ext4 without a journal (this project's bench machine) every
    creation scans past the inodes freed in the last five minutes (ext4's recently_deleted):
    under a steady load that is thousands, and creating message files took most of the
    spool writer's system time, growing with the load. Anywhere else, reuse still spares an
    inode allocation and release per message. So the daemon keeps a file it is done with:
    `keep` renames it from msg/ into tmp/ as `spare.PID.N`, and `take` claims one for the next
    message by renaming it to that message's tmp/ name. The rename is the claim: listener
    workers are other processes, and only one of them can move a given spare.

    A kept file keeps its blocks and its bytes: the next message written into it overwrites
    them and cuts the file to its own length (`_seal`) before its fsync. Emptying it at once
    (truncate) freed its blocks for the next message to allocate again, two metadata changes
    a message, and on a file system mounted with `discard` (this bench machine's) a
    synchronous TRIM each (`bench/cpu_split.py --workers 2`, median of 8 rounds: 1,603
    against 1,503 us a message, 802 against 886 msg/s, 10.9 against 8.7 context switches).
    So that nothing of a delivered message stays readable for long, a spare not taken within
    SPARE_SCRUB_S is emptied then (`scrub`: claimed by rename, as `take` claims, truncated,
    and put back), and all of them when the daemon stops. Under load nearly all are taken
    long before that; the message's bytes were in msg/ a moment before, mode 0600 in a 0700
    directory, as they are in tmp/ now.

    Bounded: past SPARES_MAX spares in tmp/ (counted every SPARES_COUNT_EVERY removals),
    files are unlinked as before. Crash-safe as tmp/ always was: spares were never
    acknowledged as anything, and tmp/ is emptied at start-up. Only the daemon keeps spares
    (its writer thread removes delivered messages); anyone may take them.
    """

    def __init__(self, tmp_dir: Path) -> None:
        self.tmp_dir = tmp_dir
        self._lock = threading.Lock()
        self._known: list[str] = []  # spare paths seen; another process may have taken some
        self._scanned = -SPARES_SCAN_S
        self._removals = 0
        self._room = True  # fewer than SPARES_MAX spares at the last count
        self._unscrubbed: deque[tuple[float, str]] = deque()  # (kept at, spare), oldest first
        self._scrubbed = -math.inf  # when the last scrub pass ran

    def keep(self, path: str, size: int | None = None) -> bool:
        """On the writer thread, for a message file leaving msg/ (of `size` bytes, if known):
        make it a spare. False when there are enough spares, or it cannot be (the caller then
        unlinks it). One larger than SPARE_FULL_MAX, or of unknown size, is emptied at once,
        so that spares never hold more than SPARES_MAX small files' worth of disk."""
        if self._removals % SPARES_COUNT_EVERY == 0:
            self._room = len(self._scan()) < SPARES_MAX
        self._removals += 1
        if not self._room:
            return False
        spare = _tmp_name(self.tmp_dir, SPARE_NAME)
        try:
            fs.replace(path, spare)
        except OSError:
            return False  # the caller unlinks it (if it is still there: tmp/ may be gone)
        full = size is not None and size <= SPARE_FULL_MAX
        if not full:
            try:
                os.truncate(spare, 0)
            except OSError:
                with contextlib.suppress(OSError):
                    fs.unlink(spare)
                return True
        with self._lock:
            self._known.append(spare)
            if full:
                self._unscrubbed.append((time.monotonic(), spare))
        return True

    def next_scrub(self) -> float:
        """When (time.monotonic) the next scrub pass is due; infinity when no spare may hold a
        message's bytes. A pass every SCRUB_EVERY_S at most, not one for each spare kept
        (a wake-up of this thread a message, and a listing of tmp/)."""
        with self._lock:
            if not self._unscrubbed:
                return math.inf
            return max(self._unscrubbed[0][0] + SPARE_SCRUB_S - SCRUB_EVERY_S,
                       self._scrubbed + SCRUB_EVERY_S)

    def scrub(self, now: float, limit: int | None) -> None:
        """On the writer thread, when next_scrub is due (`now` infinite: at the stop): empty
        the spares (at most `limit`) that nobody has taken and that would be older than
        SPARE_SCRUB_S by the next pass. tmp/ is listed once to see which are still there
        (under load nearly all were taken, and a failed claim each would be a system call a
        message). Each is claimed by rename first, so that a listener worker never takes a
        file while it is being emptied."""
        if now < self.next_scrub():
            return
        self._scrubbed = now
        upto = now - (SPARE_SCRUB_S - SCRUB_EVERY_S)
        present = set(self._scan())
        done = 0
        while limit is None or done < limit:
            with self._lock:
                if not self._unscrubbed or self._unscrubbed[0][0] > upto:
                    return
                spare = self._unscrubbed.popleft()[1]
            if spare not in present:
                continue  # taken for a new message, which overwrites it
            done += 1
            claimed = _tmp_name(self.tmp_dir, SCRUB_NAME)
            try:
                fs.replace(spare, claimed)
            except OSError:
                continue  # taken since the listing
            try:
                os.truncate(claimed, 0)
                fs.replace(claimed, spare)
            except OSError:
                with contextlib.suppress(OSError):
                    fs.unlink(claimed)

    def take(self, name: str) -> tuple[int, str] | None:
        """A spare claimed as tmp/`name`.PID.N and open for writing, or None: not emptied (its
        old bytes are overwritten, and _seal cuts it to its new length). tmp/ is
        listed when no spare is known (at most every SPARES_SCAN_S), and again at once when
        every known one was taken by another process meanwhile."""
        with self._lock:
            look = time.monotonic() - self._scanned >= SPARES_SCAN_S
            for _ in range(2):
                if not self._known and look:
                    self._scanned = time.monotonic()
                    self._known = self._scan()
                missed = False
                while self._known:
                    spare = self._known.pop()
                    target = _tmp_name(self.tmp_dir, name)
                    try:
                        fs.replace(spare, target)
                    except OSError:
                        missed = True  # another process took it
                        continue
                    try:
                        return fs.open_fd(target, os.O_WRONLY), target
                    except OSError:
                        with contextlib.suppress(OSError):
                            fs.unlink(target)
                if not missed:
                    break
                look = True
        return None

    def _scan(self) -> list[str]:
        try:
            with os.scandir(self.tmp_dir) as it:
                return [e.path for e in it if e.name.startswith(SPARE_NAME + ".")]
        except OSError:
            return []


def _create_tmp(tmp_dir: Path, name: str,
                spares: Spares | None = None) -> tuple[int, str, bool]:
    """A file in tmp/ (mode 0600), open for writing, and whether it is a spare (which may be
    longer than what goes into it: _seal cuts it) rather than a new, empty file. A spare when
    there is one. Paths are strings here: a Path a message is a few microseconds of pathlib
    each time."""
    if spares is not None:
        taken = spares.take(name)
        if taken is not None:
            return *taken, True
    tmp = _tmp_name(tmp_dir, name)
    try:
        return fs.open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), tmp, False
    except FileNotFoundError:
        if tmp_dir.exists():
            raise
        # Someone removed tmp/ while relayd runs: make it again rather than refuse every
        # message from now on.
        tmp_dir.mkdir(mode=0o700, exist_ok=True)
        log.warning("queue: %s was missing and has been made again", tmp_dir)
        return fs.open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), tmp, False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_atomic(path: Path | str, data: bytes | Iterable[bytes], tmp_dir: Path, *,
                 sync_dir: bool = True, spares: Spares | None = None) -> None:
    """Write (bytes, or chunks of them), fsync, rename into place (and fsync the directory
    unless the caller batches it)."""
    fd, tmp, spare = _create_tmp(tmp_dir, os.path.basename(path), spares)
    length = 0
    try:
        for chunk in (data,) if isinstance(data, bytes) else data:
            _write_all(fd, chunk)
            length += len(chunk)
    except BaseException:
        _drop(fd, tmp)
        raise
    _seal(fd, tmp, path, length if spare else None)
    if sync_dir:
        fsync_dir(os.path.dirname(path))


def _seal(fd: int, tmp: str, path: Path | str, length: int | None) -> None:
    """Cut a tmp/ file to the `length` bytes written into it (a spare may have been longer;
    None: a new file, nothing to cut), fsync, close and rename it into place (its directory
    is the caller's to fsync); removed instead when that fails."""
    try:
        if length is not None:
            os.ftruncate(fd, length)
        os.fsync(fd)
    except BaseException:
        _drop(fd, tmp)
        raise
    fs.close_fd(fd)
    fs.replace(tmp, path)


def _drop(fd: int, tmp: str) -> None:
    """Close and remove a tmp/ file that will not be put in place."""
    fs.close_fd(fd)
    with contextlib.suppress(OSError):
        fs.unlink(tmp)


class Draft:
    """A message file being written as the message arrives (Postfix's cleanup writes as it
    reads): its envelope first, then the bytes, in tmp/ until the spool commits it. Memory does
    not depend on the message's size. A draft never committed leaves at most a file in tmp/,
    which was never acknowledged and goes at the next start."""

    def __init__(self, entry: Entry, header: bytes, tmp_dir: Path,
                 spares: Spares | None = None) -> None:
        self.entry = entry
        self.fd: int | None = None
        self.fd, self.tmp, self._spare = _create_tmp(tmp_dir, entry.id, spares)
        try:
            _write_all(self.fd, header)
        except BaseException:
            self.discard()
            raise

    def write(self, data: bytes) -> None:
        """Append message bytes (OSError, ENOSPC say, leaves the draft to be discarded)."""
        assert self.fd is not None, "draft already sealed or discarded"
        _write_all(self.fd, data)
        self.entry.size += len(data)

    def seal(self, path: str) -> None:
        """fsync and rename into msg/ (the caller fsyncs msg/); on the writer thread."""
        assert self.fd is not None, "draft already sealed or discarded"
        fd, self.fd = self.fd, None
        _seal(fd, self.tmp, path, self.entry.file_size if self._spare else None)

    def discard(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            _drop(fd, self.tmp)


class Spool:
    """The files of one queue directory. Safe to use from the daemon and the CLI at once."""

    def __init__(self, path: Path, *, keep_spares: bool = False) -> None:
        """`keep_spares`: the daemon's spool, which keeps spent message files (Spares)."""
        self.path = Path(path)
        self.msg_dir = self.path / "msg"
        self.state_dir = self.path / "state"
        self.corrupt_dir = self.path / "corrupt"
        self.control_dir = self.path / "control"
        self.tmp_dir = self.path / "tmp"
        # As strings: a Path per entry read is a fifth of `queue list`'s time at 100,000.
        self._msg_prefix = os.path.join(self.msg_dir, "")
        self._state_prefix = os.path.join(self.state_dir, "")
        self.spares = Spares(self.tmp_dir)
        self._commit = _GroupCommit(self.msg_dir, self.tmp_dir,
                                    self.spares if keep_spares else None)
        self._lock_fd: int | None = None
        # queue id -> when (monotonic) this process removed or moved it aside: its file may
        # still be in msg/ for a moment (removals are batched), so `unknown` skips it.
        self._removed: dict[str, float] = {}

    # -- setup ---------------------------------------------------------------------------------

    def create(self) -> None:
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            for sub in SUBDIRS:
                (self.path / sub).mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise QueueError(f"cannot create queue directory {self.path}: {e.strerror}") from e

    def lock(self) -> None:
        """Take the daemon's lock; QueueError if another daemon holds it."""
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        if not fs.try_lock(fd):
            os.close(fd)
            raise QueueError(f"another relayd is using the queue {self.path}")
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fs.unlock(self._lock_fd)
            os.close(self._lock_fd)
            self._lock_fd = None

    def daemon_running(self) -> bool:
        """True when a daemon holds the lock (for the CLI)."""
        try:
            fd = os.open(self.path / "lock", os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            if not fs.try_lock(fd):
                return True
            fs.unlock(fd)
        finally:
            os.close(fd)
        return False

    def clean_tmp(self) -> None:
        """Files in tmp/ were never acknowledged to a client: remove them."""
        for p in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                fs.unlink(p)

    def writable(self) -> bool:
        """For /healthz: can a file be created and synced in the spool right now?"""
        try:
            write_atomic(self.tmp_dir / ".health", b"ok", self.tmp_dir, sync_dir=False)
            return True
        except OSError:
            return False

    # -- writing -------------------------------------------------------------------------------

    def _new_entry(self, sender: str, recipients: Sequence[str], mail_options: Sequence[str],
                   client: str, route: str | None,
                   bounce_for: tuple[str, Sequence[str]] | None = None, message_id: str = "",
                   login: str = "", queue_id: str | None = None) -> tuple[Entry, bytes]:
        """A new entry and its envelope line (the file's first line)."""
        entry = Entry(id=queue_id or new_id(), sender=_intern(sender),
                      recipients=[_intern(r) for r in dict.fromkeys(recipients)],
                      received=time.time(), mail_options=_options(mail_options),
                      client=_intern(client), route=route, message_id=message_id,
                      login=login)
        if bounce_for is not None:
            entry.bounce_for, entry.bounce_rcpts = bounce_for[0], tuple(bounce_for[1])
        entry.rcpt = {r: RecipientState() for r in entry.recipients}
        header = json.dumps(entry.envelope_json(), ensure_ascii=True,
                            separators=(",", ":")).encode() + b"\n"
        entry.data_offset = len(header)
        return entry, header

    async def accept(self, sender: str, recipients: Sequence[str], data: bytes,
                     mail_options: Sequence[str] = (), client: str = "",
                     route: str | None = None,
                     bounce_for: tuple[str, Sequence[str]] | None = None,
                     message_id: str = "", login: str = "",
                     queue_id: str | None = None) -> Entry:
        """Store a message durably. When this returns, it survives kill -9 and power loss."""
        entry, header = self._new_entry(sender, recipients, mail_options, client, route,
                                        bounce_for, message_id, login, queue_id)
        entry.size = len(data)
        await self._commit.submit(entry.id, header + data)
        return entry

    def draft(self, sender: str, recipients: Sequence[str], mail_options: Sequence[str] = (),
              client: str = "", route: str | None = None, message_id: str = "",
              login: str = "", queue_id: str | None = None) -> Draft:
        """Start a message file to write as the message arrives; `commit` makes it durable.
        OSError when tmp/ cannot take a new file."""
        entry, header = self._new_entry(sender, recipients, mail_options, client, route,
                                        message_id=message_id, login=login, queue_id=queue_id)
        return Draft(entry, header, self.tmp_dir, self.spares)

    async def commit(self, draft: Draft) -> Entry:
        """Make a draft durable, as `accept` does a message in memory (QueueError if not)."""
        await self._commit.submit(draft.entry.id, draft)
        return draft.entry

    def accept_sync(self, sender: str, recipients: Sequence[str], data: bytes,
                    mail_options: Sequence[str] = (), client: str = "",
                    route: str | None = None, message_id: str = "") -> Entry:
        entry, header = self._new_entry(sender, recipients, mail_options, client, route,
                                        message_id=message_id)
        entry.size = len(data)
        write_atomic(self.msg_dir / entry.id, header + data, self.tmp_dir, spares=self.spares)
        return entry

    def close(self) -> None:
        """Finish the writes in progress and stop the writer thread."""
        self._commit.close()

    def save_state(self, entry: Entry) -> None:
        data = json.dumps(entry.state_json(), separators=(",", ":")).encode()
        write_atomic(self.state_dir / entry.id, data, self.tmp_dir, spares=self.spares)
        entry.has_state = True

    def save_usage(self, data: bytes) -> None:
        """The mailboxes' counts (relayd.qmgr.pacing), written on the writer thread; at once
        if it has stopped."""
        path = self._state_prefix + USAGE_FILE
        if not self._commit.put(path, data):
            write_atomic(path, data, self.tmp_dir)

    def read_usage(self) -> bytes | None:
        try:
            with open(self._state_prefix + USAGE_FILE, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def remove(self, queue_id: str, *, has_state: bool = True, size: int | None = None) -> None:
        """Forget an entry. The state file goes last so a crash in between leaves a finished
        entry's content with its state, never content that looks fresh. Unlinks are metadata
        only and need no fsync: if one is lost in a crash, the message is delivered again
        (the at-most-twice case), never lost. `size`: its message file's, when known."""
        self.removing(queue_id)
        paths = [self._msg_prefix + queue_id]
        if has_state:
            paths.append(self._state_prefix + queue_id)
        if self._commit.discard(paths, size):
            return
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                fs.unlink(path)

    # -- reading -------------------------------------------------------------------------------

    def data_path(self, entry: Entry) -> Path:
        """The file that holds the message bytes, from entry.data_offset on."""
        return self.msg_dir / entry.id

    def read_data(self, entry: Entry, limit: int = -1) -> bytes:
        """The message bytes (at most `limit` of them when it is given)."""
        with fs.reading(self.data_path(entry)) as f:
            f.seek(entry.data_offset)
            return f.read(limit)

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.msg_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if ID_RE.match(n))

    def state_ids(self) -> set[str]:
        """The names in state/, listed once (cheaper than a failed open per entry)."""
        try:
            return set(os.listdir(self.state_dir))
        except FileNotFoundError:
            return set()

    def load(self, queue_id: str, *, has_state: bool | None = None) -> Entry:
        """Read one entry's envelope and state; QueueError if it is corrupt or gone.
        `has_state` False (from a listing of state/ taken when nothing else writes state
        files) skips looking for its state file; None looks."""
        return self._load(queue_id, has_state, want_data=False)[0]

    def load_accepted(self, queue_id: str) -> tuple[Entry, bytes | None]:
        """A message a listener worker has just stored: its entry (it has no state file yet)
        and, when the envelope's read took in the whole file, its bytes."""
        return self._load(queue_id, False, want_data=True)

    def _load(self, queue_id: str, has_state: bool | None,
              want_data: bool) -> tuple[Entry, bytes | None]:
        if not ID_RE.match(queue_id):
            raise QueueError(f"{queue_id!r} is not a queue id")
        try:
            fd = fs.open_fd(self._msg_prefix + queue_id, os.O_RDONLY)
        except FileNotFoundError:
            raise QueueError(f"no message {queue_id} in the queue") from None
        except OSError as e:
            raise SpoolBusyError(f"{queue_id}: cannot read: {e.strerror}") from e
        try:
            header, size, whole = _read_header(fd)
        except OSError as e:
            raise SpoolBusyError(f"{queue_id}: cannot read: {e.strerror}") from e
        finally:
            fs.close_fd(fd)
        try:
            env = json.loads(header)
            entry = Entry(id=queue_id, sender=_intern(env["sender"]),
                          recipients=[_intern(r) for r in env["recipients"]],
                          received=float(env["received"]),
                          mail_options=_options(env.get("mail_options", ())),
                          client=_intern(env.get("client", "")),
                          route=None if env.get("route") is None else _intern(env["route"]),
                          size=size, data_offset=len(header))
            entry.message_id = _str(env.get("message_id", ""))
            entry.login = _str(env.get("login", ""))
            origin = env.get("bounce_for")
            if origin is not None:
                entry.bounce_for = _str(origin["id"])
                entry.bounce_rcpts = tuple(_str(r) for r in origin["recipients"])
            if env.get("id") != queue_id or not entry.recipients or not header.endswith(b"\n"):
                raise ValueError("envelope does not match its file")
            entry.rcpt = {r: RecipientState() for r in entry.recipients}
            if has_state is not False:
                self._load_state(entry)
        except (ValueError, KeyError, TypeError) as e:
            raise QueueError(f"{queue_id}: corrupt entry: {e}") from e
        return entry, (whole[len(header):] if want_data and whole is not None else None)

    def _load_state(self, entry: Entry) -> None:
        try:
            fd = fs.open_fd(self._state_prefix + entry.id, os.O_RDONLY)
        except FileNotFoundError:
            return
        except OSError as e:
            raise SpoolBusyError(f"{entry.id}: cannot read its state: {e.strerror}") from e
        try:
            chunks = []
            while chunk := os.read(fd, STATE_READ_BYTES):
                chunks.append(chunk)
        finally:
            fs.close_fd(fd)
        raw = b"".join(chunks)
        entry.has_state = True
        state = json.loads(raw)
        entry.attempts = int(state.get("attempts", 0))
        entry.backoff = int(state.get("backoff", entry.attempts))
        entry.started = int(state.get("started", 0))
        doubt = state.get("doubt") or {}
        entry.doubt, entry.doubt_at = _str(doubt.get("why", "")), float(doubt.get("at", 0))
        entry.next_attempt = float(state.get("next_attempt", 0))
        entry.last_error = _str(state.get("last_error", ""))
        for r, s in state.get("rcpt", {}).items():
            if r in entry.rcpt:
                status = _str(s.get("status", PENDING))
                if status not in (PENDING, DELIVERED, FAILED):
                    raise ValueError(f"unknown recipient status {status!r}")
                entry.rcpt[r] = RecipientState(status, s.get("code"), _str(s.get("text", "")))

    def quarantine(self, queue_id: str, why: str) -> None:
        """Move a corrupt entry aside so it stops failing, keeping it for a human to look at."""
        self.removing(queue_id)
        for sub in ("msg", "state"):
            src = self.path / sub / queue_id
            with contextlib.suppress(FileNotFoundError):
                fs.replace(src, self.corrupt_dir / f"{queue_id}.{sub}")
        with contextlib.suppress(OSError):
            (self.corrupt_dir / f"{queue_id}.why").write_text(why + "\n", encoding="utf-8")

    def listing(self) -> tuple[list[str], set[str]]:
        """msg/ and state/, each listed once: what `recover` reads. Taken before the daemon
        accepts anything, it names only messages from before this start."""
        return self.ids(), self.state_ids()

    def recover(self, listing: tuple[list[str], set[str]] | None = None,
                stop: threading.Event | None = None) -> Iterator[Entry]:
        """Every readable entry of `listing` (by default, listed now); corrupt ones are moved
        aside and logged, never raised. Only the daemon, holding the lock, calls this, so
        nobody else writes state files meanwhile (the daemon itself writes only those of
        messages it accepted since the listing). Stops early once `stop` is set."""
        ids, states = listing if listing is not None else self.listing()
        for queue_id in ids:
            if stop is not None and stop.is_set():
                return
            try:
                yield self.load(queue_id, has_state=queue_id in states)
            except SpoolBusyError as e:
                log.warning("queue: %s; left for the queue scan", e)
                continue  # not corrupt: the daemon's scan of msg/ reads it later
            except QueueError as e:
                if "no message" in str(e):
                    continue  # removed while we listed
                log.error("queue: %s; moved to %s", e, self.corrupt_dir)
                self.quarantine(queue_id, str(e))
        # State files whose message is gone belong to entries finished just before a crash.
        listed = set(ids)
        for name in states:
            if ID_RE.match(name) and name not in listed and not (self.msg_dir / name).exists():
                with contextlib.suppress(OSError):
                    fs.unlink(self.state_dir / name)

    def removing(self, queue_id: str) -> None:
        """This process is removing `queue_id` (or moving it aside): `unknown` must not take
        its file, which may stay in msg/ for a moment, for a lost one."""
        self._removed[queue_id] = time.monotonic()

    def unknown(self, known: Container[str], min_age_s: float) -> list[str]:
        """The ids in msg/ that are not in `known` (the queue manager's), not removed by this
        process lately, and whose file was last written at least `min_age_s` ago: messages
        stored whose hand-over was lost (a listener worker killed between its fsync and its
        report, a report the daemon could not read). One listing of msg/, a set lookup per
        name, and a stat only for the names left (a handful). OSError if msg/ cannot be listed.

        Run on a thread: `known` is only read (membership), never iterated."""
        now = time.monotonic()
        for qid, when in list(self._removed.items()):
            if now - when > REMOVED_KEEP_S:
                del self._removed[qid]
        names = os.listdir(self.msg_dir)
        removed = self._removed
        unknown = [n for n in names if n not in known and n not in removed and ID_RE.match(n)]
        if not unknown:
            return []
        wall = time.time()
        out = []
        for name in unknown:
            try:
                st = os.stat(self._msg_prefix + name)
            except FileNotFoundError:
                continue
            if wall - st.st_mtime >= min_age_s:
                out.append(name)
        return sorted(out)

    def removed_lately(self, queue_id: str) -> bool:
        return queue_id in self._removed

    # -- control requests (CLI -> running daemon) ----------------------------------------------

    def request(self, action: str, target: str) -> Path:
        """Leave a request for the daemon; it deletes the file once done."""
        path = self.control_dir / f"{action}.{target}.{secrets.token_hex(4)}"
        write_atomic(path, b"", self.tmp_dir)
        return path

    def take_requests(self, actions: Sequence[str] = QUEUE_ACTIONS) -> list[tuple[str, str]]:
        """The requests for `actions`, oldest first, each removed as it is taken. The queue
        manager takes QUEUE_ACTIONS (and anything unknown, which it drops); the daemon's
        lifecycle takes "reload" (`relayd reload`), so one never eats the other's."""
        try:
            names = sorted(os.listdir(self.control_dir))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            parts = name.split(".")
            if parts[0] in CONTROL_ACTIONS and parts[0] not in actions:
                continue  # another taker's
            with contextlib.suppress(OSError):
                fs.unlink(self.control_dir / name)
            if len(parts) == 3 and parts[0] in actions:
                out.append((parts[0], parts[1]))
        return out


def _read_header(fd: int) -> tuple[bytes, int, bytes | None]:
    """A message file's envelope line (up to MAX_HEADER_BYTES), the size of what follows, and
    all that was read when that is the whole file (else None), with positional reads: one
    for a small message, whose whole file fits in the first."""
    chunk = fs.pread(fd, HEADER_READ_BYTES, 0)
    eof = len(chunk) < HEADER_READ_BYTES
    end = chunk.find(b"\n")
    while end < 0 and not eof and len(chunk) < MAX_HEADER_BYTES:
        more = fs.pread(fd, HEADER_READ_BYTES, len(chunk))
        eof = len(more) < HEADER_READ_BYTES
        found = more.find(b"\n")
        end = -1 if found < 0 else len(chunk) + found
        chunk += more
    header = chunk[:end + 1] if 0 <= end < MAX_HEADER_BYTES else chunk[:MAX_HEADER_BYTES]
    if eof:  # the whole file was read: its size is known, and its bytes are here
        return header, len(chunk) - len(header), chunk
    return header, os.fstat(fd).st_size - len(header), None


_interned: dict[str, str] = {}


def _intern(value: Any) -> str:
    """A string from an envelope, shared with every other envelope that has the same one
    (senders, recipients, clients and routes repeat: 100,000 queued for one address are one
    string, not 100,000). Bounded, so a flood of distinct addresses cannot grow it forever."""
    s = _str(value)
    shared = _interned.get(s)
    if shared is not None:
        return shared
    if len(_interned) < INTERN_MAX:
        _interned[s] = s
    return s


def _options(values: Iterable[Any]) -> Sequence[str]:
    """MAIL FROM parameters as a list, or the one shared empty tuple (most messages have
    none; an empty list each is 7 MB at 100,000 queued)."""
    return [_intern(v) for v in values] or ()


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value
