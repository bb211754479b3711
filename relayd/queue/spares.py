"""Spent message files kept in tmp/ for reuse (`Spares`): a speed-up of the spool, in a room
of its own. Why it exists and what it costs are in the class's docstring; the spool works the
same without it (a spool made without `keep_spares` never keeps one)."""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections import deque
from pathlib import Path

from relayd.platform import fs

SPARE_NAME = "spare"  # tmp/spare.PID.N
SPARES_MAX = 256  # spent message files kept in tmp/ (about the messages in flight at a time)
SPARES_COUNT_EVERY = 64  # files removed between two counts of the spares in tmp/
SPARES_SCAN_S = 0.05  # at most this often, tmp/ is listed for spares other processes left
SPARE_SCRUB_S = 1.0  # a spare still holding a delivered message's bytes is emptied by then
SCRUB_EVERY_S = 0.25  # ... by a pass this often over those kept longest (one listing of tmp/)
SPARE_FULL_MAX = 64 * 1024  # a larger file is emptied as it becomes a spare (its blocks freed)
SCRUB_NAME = "scrub"  # tmp/scrub.PID.N: a spare claimed for emptying


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
    them and cuts the file to its own length (`fs.seal`) before its fsync. Emptying it at once
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
        spare = fs.tmp_name(self.tmp_dir, SPARE_NAME)
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
            claimed = fs.tmp_name(self.tmp_dir, SCRUB_NAME)
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
        old bytes are overwritten, and fs.seal cuts it to its new length). tmp/ is
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
                    target = fs.tmp_name(self.tmp_dir, name)
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
