"""The durable spool: the files of one queue directory (the layout is relayd.queue's
docstring), and nothing about scheduling. Writing goes through the group commit
(relayd.queue.commit); durable writes and renames through relayd.platform.fs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Container, Iterator, Sequence
from pathlib import Path

from relayd.errors import QueueError, SpoolBusyError
from relayd.platform import fs
from relayd.queue.commit import Draft, GroupCommit
from relayd.queue.control import QUEUE_ACTIONS, leave_request, take_requests
from relayd.queue.entry import (
    DELIVERED,
    FAILED,
    ID_RE,
    PENDING,
    Entry,
    RecipientState,
    as_str,
    intern,
    new_id,
    options,
)
from relayd.queue.spares import Spares

log = logging.getLogger("relayd.queue")  # the name its log lines always had

SUBDIRS = ("msg", "state", "corrupt", "control", "tmp")
MAX_HEADER_BYTES = 1024 * 1024  # an envelope line longer than this is corrupt
HEADER_READ_BYTES = 8192  # first read of a message file: the envelope (and all of a small one)
STATE_READ_BYTES = 65536
REMOVED_KEEP_S = 30.0  # ids removed this recently are never taken for unknown entries (scan)
USAGE_FILE = "mailboxes"  # in state/: the mailboxes' counts (not a queue id: recover skips it)


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
        self._commit = GroupCommit(self.msg_dir, self.tmp_dir,
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
            fs.write_atomic(self.tmp_dir / ".health", b"ok", self.tmp_dir, sync_dir=False)
            return True
        except OSError:
            return False

    # -- writing -------------------------------------------------------------------------------

    def _new_entry(self, sender: str, recipients: Sequence[str], mail_options: Sequence[str],
                   client: str, route: str | None,
                   bounce_for: tuple[str, Sequence[str]] | None = None, message_id: str = "",
                   login: str = "", queue_id: str | None = None) -> tuple[Entry, bytes]:
        """A new entry and its envelope line (the file's first line)."""
        entry = Entry(id=queue_id or new_id(), sender=intern(sender),
                      recipients=[intern(r) for r in dict.fromkeys(recipients)],
                      received=time.time(), mail_options=options(mail_options),
                      client=intern(client), route=route, message_id=message_id,
                      login=login)
        if bounce_for is not None:
            entry.bounce_for, entry.bounce_rcpts = bounce_for[0], tuple(bounce_for[1])
        entry.rcpt = {r: RecipientState() for r in entry.recipients}
        header = json.dumps(entry.envelope_json(), ensure_ascii=True,
                            separators=(",", ":")).encode() + b"\n"
        entry.data_offset = len(header)
        return entry, header

    async def store(self, sender: str, recipients: Sequence[str], data: bytes,
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
        """Make a draft durable, as `store` does a message in memory (QueueError if not)."""
        await self._commit.submit(draft.entry.id, draft)
        return draft.entry

    def store_sync(self, sender: str, recipients: Sequence[str], data: bytes,
                    mail_options: Sequence[str] = (), client: str = "",
                    route: str | None = None, message_id: str = "") -> Entry:
        entry, header = self._new_entry(sender, recipients, mail_options, client, route,
                                        message_id=message_id)
        entry.size = len(data)
        fs.write_atomic(self.msg_dir / entry.id, header + data, self.tmp_dir, spares=self.spares)
        return entry

    def close(self) -> None:
        """Finish the writes in progress and stop the writer thread."""
        self._commit.close()

    def save_state(self, entry: Entry) -> None:
        data = json.dumps(entry.state_json(), separators=(",", ":")).encode()
        fs.write_atomic(self.state_dir / entry.id, data, self.tmp_dir, spares=self.spares)
        entry.has_state = True

    def save_usage(self, data: bytes) -> None:
        """The mailboxes' counts (relayd.qmgr.pacing), written on the writer thread; at once
        if it has stopped."""
        path = self._state_prefix + USAGE_FILE
        if not self._commit.put(path, data):
            fs.write_atomic(path, data, self.tmp_dir)

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

    def load_stored(self, queue_id: str) -> tuple[Entry, bytes | None]:
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
            entry = Entry(id=queue_id, sender=intern(env["sender"]),
                          recipients=[intern(r) for r in env["recipients"]],
                          received=float(env["received"]),
                          mail_options=options(env.get("mail_options", ())),
                          client=intern(env.get("client", "")),
                          route=None if env.get("route") is None else intern(env["route"]),
                          size=size, data_offset=len(header))
            entry.message_id = as_str(env.get("message_id", ""))
            entry.login = as_str(env.get("login", ""))
            origin = env.get("bounce_for")
            if origin is not None:
                entry.bounce_for = as_str(origin["id"])
                entry.bounce_rcpts = tuple(as_str(r) for r in origin["recipients"])
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
        entry.doubt, entry.doubt_at = as_str(doubt.get("why", "")), float(doubt.get("at", 0))
        entry.next_attempt = float(state.get("next_attempt", 0))
        entry.last_error = as_str(state.get("last_error", ""))
        for r, s in state.get("rcpt", {}).items():
            if r in entry.rcpt:
                status = as_str(s.get("status", PENDING))
                if status not in (PENDING, DELIVERED, FAILED):
                    raise ValueError(f"unknown recipient status {status!r}")
                entry.rcpt[r] = RecipientState(status, s.get("code"), as_str(s.get("text", "")))

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

    # -- control requests (CLI -> running daemon; relayd.queue.control) --------------------------

    def request(self, action: str, target: str) -> Path:
        """Leave a request for the daemon; it deletes the file once done."""
        return leave_request(self.control_dir, self.tmp_dir, action, target)

    def take_requests(self, actions: Sequence[str] = QUEUE_ACTIONS) -> list[tuple[str, str]]:
        """The requests for `actions`, oldest first, each removed as it is taken (control)."""
        return take_requests(self.control_dir, actions)


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
