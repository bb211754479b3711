"""The queue manager's ways in besides `submit`: the scan of msg/ for entries nobody scheduled,
and the control requests (`relayd queue retry|delete`, the web console's retry and delete).

The hand-over from a listener is a hint, not the only way in (Postfix's qmgr scans its
incoming queue on a timer for the same reason): every SCAN_INTERVAL_S the manager lists msg/
and takes every entry it does not know whose file is at least SCAN_MIN_AGE_S old (a listener
worker killed between its fsync and its report, a report this process could not read), and
`queue retry --all` scans first. Ids reported but unreadable for a moment (out of descriptors)
are tried again every CONTROL_POLL_S. Nothing is scheduled twice: an id is taken only if it is
not queued, on the event loop, and never if this process removed it lately (its file may
linger for a moment; `Spool.unknown`). At 100,000 queued a scan is one listing of msg/ and a set
lookup per name, on a thread (bench/scan.py). Rejected: scanning only at start (a lost report
waited for a restart) and an inotify watch (not on every platform relayd runs on).

`Control` is a part of relayd.qmgr.manager.QueueManager (a mixin: the state is the manager's).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from relayd.config import RouteConfig
from relayd.delivery.agent import DeliveryAgent
from relayd.errors import QueueError, SpoolBusyError
from relayd.journal import Journal
from relayd.qmgr.queued import ACTIVE, DEFERRED, Queued
from relayd.queue import Entry, Spool

log = logging.getLogger("relayd.qmgr.manager")

CONTROL_POLL_S = 0.5
CONTROL_ERROR_LOG_S = 60.0
SCAN_INTERVAL_S = 15.0  # msg/ is scanned for entries nobody scheduled this often
SCAN_MIN_AGE_S = 5.0  # ... that were last written at least this long ago
SCAN_ERROR_LOG_S = 60.0
SCAN_LOG_IDS = 10  # ids named in the scan's log line


class Control:
    """The scan and the control requests of relayd.qmgr.manager.QueueManager."""

    spool: Spool
    journal: Journal | None
    agents: dict[str, DeliveryAgent]
    on_found: Callable[[Entry], None] | None
    _messages: dict[str, Queued]
    _unread: set[str]
    _wake: asyncio.Event
    _scan_error_at: float
    _control_error_at: float
    _last_scan: float
    _deleted_by: dict[str, str]

    if TYPE_CHECKING:
        def route_for(self, entry: Entry) -> RouteConfig | None: ...
        def take_recovered(self, entries: list[Entry]) -> None: ...
        def _make_due(self, queued: Queued) -> None: ...
        def _forget(self, queued: Queued, why: str) -> None: ...
        def _record(self, event: str, queued: Queued, route: RouteConfig | None,
                    recipients: list[str], **fields: Any) -> None: ...

    def read_later(self, queue_id: str) -> None:
        """A reported id whose entry could not be read for now (SpoolBusyError): tried again
        every CONTROL_POLL_S, and in any case found by the next scan."""
        self._unread.add(queue_id)
        self._wake.set()

    async def scan(self, *, everything: bool = True) -> int:
        """Take the entries of msg/ this manager does not know (see the module docstring);
        with `everything` False, only the reported ids that could not be read. Returns how
        many were queued."""
        loop_ids = sorted(self._unread)
        self._unread.clear()
        found: list[Entry] = []
        busy: list[str] = []

        def read() -> None:
            ids = loop_ids
            if everything:
                ids = sorted(set(ids) | set(self.spool.unknown(self._messages, SCAN_MIN_AGE_S)))
            for qid in ids:
                if qid in self._messages:
                    continue
                try:
                    found.append(self.spool.load(qid))
                except SpoolBusyError:
                    busy.append(qid)
                except QueueError as e:
                    if "no message" in str(e):
                        continue
                    log.error("queue: %s; moved to %s", e, self.spool.corrupt_dir)
                    self.spool.quarantine(qid, str(e))

        try:
            await asyncio.to_thread(read)
        except OSError as e:
            busy = loop_ids
            self._scan_failed(e)
        self._unread.update(busy)
        # On the event loop: one last check against what arrived meanwhile.
        taken = [e for e in found
                 if e.id not in self._messages and not self.spool.removed_lately(e.id)]
        if not taken:
            return 0
        ids = [e.id for e in taken]
        log.warning("queue: %d message(s) in %s were not scheduled (a lost or unreadable "
                    "report); queued now: %s%s", len(ids), self.spool.msg_dir,
                    ", ".join(ids[:SCAN_LOG_IDS]), " ..." if len(ids) > SCAN_LOG_IDS else "")
        for entry in taken:
            if self.on_found is not None and entry.pending():
                self.on_found(entry)
        self.take_recovered(taken)
        return len(taken)

    def _scan_failed(self, e: OSError) -> None:
        now = time.monotonic()
        if now - self._scan_error_at >= SCAN_ERROR_LOG_S:
            self._scan_error_at = now
            log.warning("queue: cannot scan %s yet: %s (tried again in %ds)",
                        self.spool.msg_dir, e, SCAN_INTERVAL_S)

    async def _control(self) -> None:
        try:
            requests = await asyncio.to_thread(self.spool.take_requests)
        except OSError as e:
            # Polled twice a second: say so once a minute (EMFILE under a flood would
            # otherwise be two lines a second). Out of descriptors is the state the listener
            # already warns of (sessions hold them; they come back as sessions end), and the
            # requests wait in the directory meanwhile: a warning, naming what to raise.
            now = time.monotonic()
            if now - self._control_error_at >= CONTROL_ERROR_LOG_S:
                self._control_error_at = now
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    log.warning("queue: cannot read control requests yet: %s (raise "
                                "LimitNOFILE, or lower server.max_sessions)", e)
                else:
                    log.error("queue: cannot read control requests: %s", e)
            return
        if ("retry", "all") in requests:
            self._last_scan = time.monotonic()
            await self.scan()  # so that entries nobody scheduled are retried too
        for action, target in requests:
            ids = list(self._messages) if target == "all" else [target]
            if action == "retry" and target == "all":
                # One line for all of them, not one per message (100,000 lines at scale).
                log.info("queue: retry requested for all %d message(s)", len(ids))
                for agent in self.agents.values():
                    agent.release_hold()
            for qid in ids:
                queued = self._messages.get(qid)
                if queued is None:
                    continue
                if action == "retry":
                    self.retry(queued, release_route=target != "all", quiet=target == "all")
                elif action == "delete":
                    self.delete(queued)

    def retry(self, queued: Queued, *, release_route: bool = True, quiet: bool = False) -> None:
        """`relayd queue retry`: clear the backoff and the route's hold; try at once."""
        if not quiet:
            log.info("%s: retry requested", queued.id)
        queued.entry.backoff = 0
        if release_route:
            route = self.route_for(queued.entry)
            if route is not None and route.name in self.agents:
                self.agents[route.name].release_hold()
        if queued.state == DEFERRED:
            self._make_due(queued)

    def delete(self, queued: Queued) -> None:
        if queued.state == ACTIVE:
            queued.deleted = True  # removed when its attempt ends
            return
        self._forget(queued, "deleted by the admin")

    def retry_ids(self, ids: list[str], admin: str, route: str | None = None) -> int:
        """The web console's retry, by an admin: as `relayd queue retry` for each id still
        queued, journaled as `retry` naming the admin: one event a message, or, for all of a
        `route`'s messages, one event for the route (its queue id `*`, with the count: 100,000
        events at once would overrun the journal's queue). How many were queued."""
        done = 0
        if route is not None and route in self.agents:
            self.agents[route].release_hold()  # first, as `queue retry --all` does
        for qid in ids:
            queued = self._messages.get(qid)
            if queued is None:
                continue
            if route is None:
                self._record("retry", queued, self.route_for(queued.entry),
                             queued.entry.pending(), admin=admin)
            self.retry(queued, release_route=route is None, quiet=len(ids) > 1)
            done += 1
        if route is not None and self.journal is not None:
            self.journal.record("retry", "*", route=route, admin=admin, count=done)
        if len(ids) > 1 or route is not None:
            log.info("queue: retry requested by %s for %d message(s)%s", admin, done,
                     f" of route {route}" if route else "")
        return done

    def delete_ids(self, ids: list[str], admin: str) -> int:
        """The web console's delete, by an admin: as `relayd queue delete`; the `deleted`
        journal event names the admin. How many were queued."""
        done = 0
        for qid in ids:
            queued = self._messages.get(qid)
            if queued is None:
                continue
            self._deleted_by[qid] = admin
            log.info("%s: delete requested by %s", qid, admin)
            self.delete(queued)
            done += 1
        return done
